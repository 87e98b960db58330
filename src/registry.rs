//! The library's core module, `ngx_consul_upstream_module`: its conf is the
//! cycle's [`Registry`] of every upstream with `consul_upstream` lines, stream
//! and http, and of the state files they use. Discovery, the master's fill and
//! the status page read the upstreams from here, whichever protocol's block
//! they were written in; the directive checks that a state file has one owner.
//!
//! nginx creates a core module's conf per cycle (a dynamic module's when
//! `load_module` loads it, before any `stream {}` or `http {}` is read), in
//! the cycle's pool: it goes with its cycle.

use std::ffi::c_void;
use std::path::PathBuf;

use ngx::core::Pool;
use ngx::ffi::{ngx_conf_t, ngx_cycle_t};

use consul_core::key::UpstreamKey;

use crate::upstream::Upstream;

/// A `state=` file in use.
struct StateFile {
    /// The file, however spelled (`consul_core::state::resolved_path`).
    file: PathBuf,
    /// As written (under nginx's prefix).
    written: String,
    owner: UpstreamKey,
}

/// Every upstream with `consul_upstream` lines of one cycle, in configuration
/// order, and the state files they use.
#[derive(Default)]
pub struct Registry {
    upstreams: Vec<*const Upstream>,
    state_files: Vec<StateFile>,
}

/// `create_conf` of the core module.
pub unsafe extern "C" fn create_conf(cycle: *mut ngx_cycle_t) -> *mut c_void {
    // SAFETY: nginx passes the cycle being set up; its pool lives as long as the
    // cycle, and `allocate` registers a cleanup that drops the value.
    let pool = unsafe { Pool::from_ngx_pool((*cycle).pool) };
    pool.allocate(Registry::default()) as *mut c_void
}

fn module_index() -> usize {
    // SAFETY: the module's own static; nginx sets its index when it loads it.
    unsafe { (*std::ptr::addr_of!(crate::ngx_consul_upstream_module)).index }
}

impl Registry {
    /// The registry of the cycle being configured.
    pub fn of_conf(cf: &ngx_conf_t) -> Option<&'static mut Registry> {
        // SAFETY: the cycle being configured; conf_ctx has a slot per module
        // index, the core module's holding what create_conf made.
        unsafe {
            let cycle = cf.cycle.as_ref()?;
            (*cycle.conf_ctx.add(module_index()) as *mut Registry).as_mut()
        }
    }

    /// The registry of a configured cycle.
    pub fn of_cycle(cycle: &ngx_cycle_t) -> Option<&'static Registry> {
        // SAFETY: as above; the conf lives as long as the cycle.
        unsafe { (*cycle.conf_ctx.add(module_index()) as *const Registry).as_ref() }
    }

    pub fn add(&mut self, up: &Upstream) {
        self.upstreams.push(up);
    }

    /// Every upstream, in configuration order.
    pub fn upstreams(&self) -> impl Iterator<Item = &'static Upstream> + '_ {
        // SAFETY: upstreams live in their blocks' confs, as long as the cycle
        // that holds this registry.
        self.upstreams.iter().map(|&up| unsafe { &*up })
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Makes `owner` the one upstream that uses state file `full` (as written,
    /// made absolute); refused when another already does, however spelled.
    pub fn claim_state_file(&mut self, full: &str, owner: &UpstreamKey) -> Result<(), String> {
        // One file, one upstream (see resolved_path; a directory created later
        // is judged as written).
        let file = consul_core::state::resolved_path(std::path::Path::new(full));
        if let Some(other) = self.state_files.iter().find(|s| s.file == file) {
            return Err(other.owner.state_file_taken(full, &other.written));
        }
        self.state_files.push(StateFile {
            file,
            written: full.to_string(),
            owner: owner.clone(),
        });
        Ok(())
    }
}
