//! `consul_upstream_status [json | prometheus];` in an http `location` (a
//! directive of the library's http module) answers with what the balancers see:
//! every upstream with `consul_upstream` lines, stream ones first, then http
//! ones, each in configuration order, read from their shared zones (layout and
//! rendering in `consul_core::status`).
//!
//! Costs nothing where unused: no phase handler; the directive only sets its
//! location's content handler. A request reads the
//! zones without a lock (the balancer never waits for it) in O(peers), in any
//! worker, from any `server`: every worker maps the same zones.

use std::ffi::{c_char, c_void};
use std::panic::AssertUnwindSafe;
use std::ptr;

use ngx::ffi::{
    ngx_chain_t, ngx_command_t, ngx_conf_t, ngx_create_temp_buf, ngx_http_discard_request_body,
    ngx_http_output_filter, ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_str_t, off_t,
    NGX_ERROR, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_ALLOWED,
    NGX_HTTP_OK, NGX_LOG_EMERG, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};

use consul_core::key::ProtocolKind;
use consul_core::status::{
    json, prometheus, LineConf, Report, UpstreamConf, UpstreamReport, JSON_CONTENT_TYPE,
    PROMETHEUS_CONTENT_TYPE,
};

use crate::registry::Registry;
use crate::{ffi, log};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Prometheus,
}

type Handler = unsafe extern "C" fn(*mut ngx_http_request_t) -> ngx_int_t;

/// `consul_upstream_status [json | prometheus];` in `location {}`.
pub unsafe extern "C" fn consul_upstream_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed.
    let cf_ref = unsafe { &mut *cf };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| directive(cf_ref)))
        .unwrap_or_else(|_| Err("internal error (panic) while reading the directive".into()));
    match result {
        Ok(()) => ngx::core::NGX_CONF_OK,
        Err(msg) => {
            ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", msg);
            ngx::core::NGX_CONF_ERROR
        }
    }
}

fn directive(cf: &mut ngx_conf_t) -> Result<(), String> {
    // SAFETY: cf.args holds the directive's words as ngx_str_t.
    let args = unsafe { (*cf.args).as_slice::<ngx_str_t>() };
    let format = match args.get(1).map(|a| a.as_bytes()) {
        None | Some(b"json") => Format::Json,
        Some(b"prometheus") => Format::Prometheus,
        Some(other) => {
            return Err(format!(
                "invalid parameter \"{}\"",
                String::from_utf8_lossy(other)
            ))
        }
    };
    let clcf = NgxHttpCoreModule::location_conf_mut(cf).ok_or("no location configuration")?;
    let ours: [Handler; 2] = [status_json, status_prometheus];
    if clcf
        .handler
        .is_some_and(|h| ours.iter().any(|&o| std::ptr::fn_addr_eq(h, o)))
    {
        return Err("\"consul_upstream_status\" directive is duplicate".into());
    }
    clcf.handler = Some(match format {
        Format::Json => status_json,
        Format::Prometheus => status_prometheus,
    });
    Ok(())
}

unsafe extern "C" fn status_json(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a live request.
    unsafe { respond(r, Format::Json) }
}

unsafe extern "C" fn status_prometheus(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: as for status_json.
    unsafe { respond(r, Format::Prometheus) }
}

/// # Safety
/// `r` must be a live request in its content phase.
unsafe fn respond(r: *mut ngx_http_request_t, format: Format) -> ngx_int_t {
    // SAFETY: per the contract.
    let r = unsafe { &mut *r };
    std::panic::catch_unwind(AssertUnwindSafe(|| serve(r, format))).unwrap_or_else(|_| {
        log::alert!("consul upstream status: request failed (panic)");
        NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t
    })
}

fn serve(r: &mut ngx_http_request_t, format: Format) -> ngx_int_t {
    if r.method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
        return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
    }
    // SAFETY: a live request.
    let rc = unsafe { ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    let report = read_report();
    let (body, content_type) = match format {
        Format::Json => (json(&report), JSON_CONTENT_TYPE),
        Format::Prometheus => (prometheus(&report), PROMETHEUS_CONTENT_TYPE),
    };
    // SAFETY: a live request has a live connection.
    let log = unsafe { (*r.connection).log };
    ngx::ngx_log_debug!(
        mask: ngx::log::DebugMask::Http,
        log,
        "consul upstream status: {} upstreams, {format:?}, {} bytes",
        report.upstreams.len(),
        body.len()
    );

    r.headers_out.status = NGX_HTTP_OK as usize;
    r.headers_out.content_type = ngx_str_t {
        len: content_type.len(),
        // nginx only reads it; the text is static.
        data: content_type.as_ptr() as *mut u8,
    };
    r.headers_out.content_type_len = content_type.len();
    r.headers_out.content_type_lowcase = ptr::null_mut();
    r.headers_out.content_length_n = body.len() as off_t;
    // SAFETY: a live request whose headers are set.
    let rc = unsafe { ngx_http_send_header(r) };
    // The method, not r->header_only (which nginx sets for HEAD): on nginx 1.29
    // an in_port_t precedes the request's bit-fields and bindgen places them 2
    // bits off, so header_only() reads `pipeline` there.
    if rc == NGX_ERROR as ngx_int_t
        || rc > NGX_OK as ngx_int_t
        || r.method == NGX_HTTP_HEAD as usize
    {
        return rc;
    }
    // SAFETY: the request's pool lives as long as the request.
    let b = unsafe { ngx_create_temp_buf(r.pool, body.len()) };
    // SAFETY: null, or a fresh buffer of body.len() bytes.
    let Some(buf) = (unsafe { b.as_mut() }) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: buf.pos has room for body.len() bytes.
    unsafe {
        ptr::copy_nonoverlapping(body.as_ptr(), buf.pos, body.len());
        buf.last = buf.pos.add(body.len());
    }
    buf.set_last_buf(u32::from(ptr::eq(r, r.main)));
    buf.set_last_in_chain(1);
    let mut out = ngx_chain_t {
        buf: b,
        next: ptr::null_mut(),
    };
    // SAFETY: a live request; the chain is read before the call returns or
    // copied by the filters that keep it.
    unsafe { ngx_http_output_filter(r, &mut out) }
}

/// Every upstream with `consul_upstream` lines, as this worker reads it now.
fn read_report() -> Report {
    let now_unix = ffi::unix_now();
    let now_ms = ffi::current_msec();
    let mut report = Report {
        now_unix,
        upstreams: Vec::new(),
    };
    // SAFETY: plain read of the running cycle's pointer.
    let cycle = unsafe { ngx::ffi::ngx_cycle };
    // SAFETY: in a worker serving requests, ngx_cycle is fully initialized.
    let Some(cycle) = (unsafe { cycle.as_ref() }) else {
        return report;
    };
    let Some(registry) = Registry::of_cycle(cycle) else {
        return report;
    };
    let by_protocol =
        ProtocolKind::ALL.map(|p| registry.upstreams().filter(move |up| up.key.protocol == p));
    for up in by_protocol.into_iter().flatten() {
        let conf = UpstreamConf {
            key: up.key.clone(),
            lines: up
                .lines
                .iter()
                .map(|l| LineConf {
                    settings: &l.settings,
                    tag: l.tag,
                })
                .collect(),
            fallback_servers: up.fallback.get().servers,
        };
        let zone = up.zone();
        report.upstreams.push(UpstreamReport::read(
            &conf,
            zone.as_ref().map(|z| z.zone()),
            now_unix,
            now_ms,
        ));
    }
    report
}
