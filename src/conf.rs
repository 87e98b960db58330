//! Configuration: the `consul_upstream` directive, the module's confs, and the
//! checks that need the whole `stream {}` block.

use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::path::Path;
use std::ptr;

use ngx::core::Pool;
use ngx::ffi::{
    ngx_command_t, ngx_conf_full_name, ngx_conf_t, ngx_int_t, ngx_log_error_core, ngx_str_t,
    ngx_stream_upstream_module, ngx_stream_upstream_srv_conf_t, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
    NGX_STREAM_UPSTREAM_BACKUP,
};

use consul_core::key::UpstreamKey;
use consul_core::peer::line_source_tag;
use consul_core::settings::{upstream_wide_param, Settings};
use consul_core::state::resolved_path;
use consul_core::view::{Balancing, PeerView};
use consul_core::zone::MAX_LINES;

use crate::upstream::{
    add_placeholder, Fallback, Line, Local, MainConf, SrvConf, StatePath, Upstream,
};
use crate::{ffi, zone};

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes the configuration being parsed; its pool lives as long
    // as the cycle, and `allocate` registers a cleanup that drops the value.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(MainConf::default()) as *mut c_void
}

pub unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as in create_main_conf.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(SrvConf::default()) as *mut c_void
}

fn conf_log(cf: *mut ngx_conf_t, msg: &str) {
    ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", msg);
}

fn str_of(s: &ngx_str_t) -> String {
    if s.len == 0 || s.data.is_null() {
        return String::new();
    }
    // SAFETY: an ngx_str_t from nginx points at `len` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(s.data, s.len) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// `consul_upstream QUERY | service=NAME [parameters];` in `upstream {}`.
pub unsafe extern "C" fn consul_upstream(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed
    // and, for NGX_STREAM_SRV_CONF_OFFSET, this module's conf of the upstream block.
    let (cf_ref, srv) = unsafe { (&mut *cf, &mut *(conf as *mut SrvConf)) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| directive(cf_ref, srv)))
        .unwrap_or_else(|_| Err("internal error (panic) while reading the directive".into()));
    match result {
        Ok(()) => ffi::CONF_OK,
        Err(msg) => {
            conf_log(cf, &msg);
            ffi::conf_error()
        }
    }
}

fn directive(cf: &mut ngx_conf_t, srv: &mut SrvConf) -> Result<(), String> {
    // SAFETY: cf.args holds the directive's words as ngx_str_t.
    let args = unsafe { (*cf.args).as_slice::<ngx_str_t>() };
    let owned: Vec<String> = args.iter().skip(1).map(str_of).collect();
    let words: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut settings = Settings::parse(&words).map_err(|e| e.0)?;
    let api = crate::api::configure(&mut settings, &mut |p| full_name(cf, p))?;
    let (file, line) = ffi::conf_position(cf);
    let taken: Vec<u32> = srv
        .upstream
        .iter()
        .flat_map(|up| &up.lines)
        .map(|l| l.tag)
        .collect();
    let new = Line {
        tag: line_source_tag(&settings.query, &taken),
        settings,
        file,
        line,
        api,
    };

    // A further line adds the instances of another query to the same upstream.
    if let Some(up) = srv.upstream.as_mut() {
        if let Some(same) = up
            .lines
            .iter()
            .find(|l| l.settings.query == new.settings.query)
        {
            // However it is written (`service=redis`, `redis.service.consul`).
            return Err(format!(
                "\"consul_upstream\" directive is duplicate: query \"{}\" is already in {}:{}",
                same.settings.query, same.file, same.line
            ));
        }
        if let Some(w) = upstream_wide_param(&words) {
            return Err(format!(
                "invalid parameter \"{w}\": it belongs on the first \"consul_upstream\" line of the upstream"
            ));
        }
        if up.lines.len() >= MAX_LINES {
            return Err(format!(
                "too many \"consul_upstream\" lines in one upstream (at most {MAX_LINES})"
            ));
        }
        up.lines.push(new);
        return Ok(());
    }

    // SAFETY: inside `upstream {}` of `stream {}`: the upstream module's conf.
    let uscf = unsafe {
        &mut *(ffi::conf_srv_conf(cf, &*ptr::addr_of!(ngx_stream_upstream_module))
            as *mut ngx_stream_upstream_srv_conf_t)
    };
    // nginx's own methods before this line were seen (and recorded) by this
    // module; any other balancer cannot work with discovered peers.
    if uscf.peer.init_upstream.is_some() && srv.method.is_none() {
        return Err(
            "\"consul_upstream\" cannot be combined with another load balancing method".into(),
        );
    }
    uscf.peer.init_upstream = Some(crate::balancer::init_upstream);
    // Static servers are round robin's, which has backups, whatever method
    // (hash, random) the discovered peers are balanced by.
    uscf.flags |= NGX_STREAM_UPSTREAM_BACKUP as ngx::ffi::ngx_uint_t;
    add_placeholder(cf, uscf)?;

    let name = str_of(&uscf.host);
    // SAFETY: the stream block's context: this module's main conf.
    let main = unsafe { &mut *(ffi::conf_main_conf(cf, ffi::module()) as *mut MainConf) };
    let state_path = match &new.settings.state_path {
        Some(path) => {
            let full = full_name(cf, path)?;
            // One file, one upstream, however it is spelled (see resolved_path;
            // a directory created later is judged as written).
            let file = resolved_path(Path::new(&full));
            if let Some(other) = main.state_paths.iter().find(|s| s.file == file) {
                return Err(other.upstream.state_file_taken(&full, &other.written));
            }
            main.state_paths.push(StatePath {
                file,
                written: full.clone(),
                upstream: UpstreamKey::stream(name.as_str()),
            });
            Some(full)
        }
        None => None,
    };
    let shm_zone = zone::register(
        cf,
        &UpstreamKey::stream(name.as_str()),
        new.settings.zone_size,
    )?;
    let upstream = Box::new(Upstream {
        name,
        lines: vec![new],
        state_path,
        uscf,
        shm_zone,
        fallback: std::cell::Cell::new(Fallback::default()),
        hash_key: std::cell::Cell::new(ptr::null_mut()),
        // The method is known once the block is read: see balancer::init_upstream.
        local: RefCell::new(Local::new(PeerView::new(Balancing::default()))),
    });
    main.upstreams.push(&*upstream as *const Upstream);
    srv.upstream = Some(upstream);
    Ok(())
}

/// `path` under nginx's prefix when relative, as nginx resolves its own files.
fn full_name(cf: &mut ngx_conf_t, path: &str) -> Result<String, String> {
    let mut name = ffi::pool_str(cf, path).ok_or("out of memory")?;
    // SAFETY: cf.cycle is the cycle being configured; nginx allocates the full
    // name from its pool.
    if unsafe { ngx_conf_full_name(cf.cycle, &mut name, 0) } != NGX_OK as ngx_int_t {
        return Err("out of memory".into());
    }
    Ok(str_of(&name))
}

/// An `[emerg]` line outside a directive (the message names the place).
fn emerg(cf: &ngx_conf_t, msg: &str) {
    // SAFETY: a plain log call with a "%*s" format and its two arguments.
    unsafe {
        ngx_log_error_core(
            NGX_LOG_EMERG as usize,
            cf.log,
            0,
            c"%*s".as_ptr(),
            msg.len(),
            msg.as_ptr(),
        )
    };
}

/// After `stream {}` is parsed: a later `hash`, `least_conn` or `random` in the
/// same block replaced our balancer (nginx only warns); refuse that. A
/// `backup` server taken after `hash` or `random` in a block that got no
/// `consul_upstream` line is refused as nginx refuses it.
pub unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes the configuration of the parsed stream block.
    let cf_ref = unsafe { &mut *cf };
    // SAFETY: the stream block's context: this module's main conf, or null.
    let main = unsafe { (ffi::conf_main_conf(cf_ref, ffi::module()) as *const MainConf).as_ref() };
    let Some(main) = main else {
        return NGX_OK as ngx_int_t;
    };
    for &srv in &main.deferred_backups {
        // SAFETY: block confs live as long as the configuration.
        let srv = unsafe { &*srv };
        if let (None, Some((file, line))) = (&srv.upstream, &srv.deferred_backup) {
            emerg(
                cf_ref,
                &format!("balancing method does not support parameter \"backup\" in {file}:{line}"),
            );
            return NGX_ERROR as ngx_int_t;
        }
    }
    for &up in &main.upstreams {
        // SAFETY: upstream confs live as long as the configuration.
        let up = unsafe { &*up };
        let ours: unsafe extern "C" fn(_, _) -> _ = crate::balancer::init_upstream;
        // SAFETY: the upstream block's conf, set at configuration time.
        let kept =
            unsafe { (*up.uscf).peer.init_upstream }.is_some_and(|f| std::ptr::fn_addr_eq(f, ours));
        if !kept {
            emerg(
                cf_ref,
                &format!(
                    "\"consul_upstream\" cannot be combined with another load balancing method in {}:{}",
                    up.first().file,
                    up.first().line
                ),
            );
            return NGX_ERROR as ngx_int_t;
        }
    }
    NGX_OK as ngx_int_t
}
