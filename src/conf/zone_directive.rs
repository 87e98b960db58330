//! nginx's `zone` directive in an upstream, seen first (as the balancing
//! directives in [`super::methods`]): the zone names of `consul_upstream`
//! upstreams are this module's (see [`crate::zone`]).

use std::ffi::{c_char, c_void};

use ngx::ffi::{ngx_command_t, ngx_conf_t, ngx_str_t};

use consul_core::key::UpstreamKey;

use super::methods::NginxHandler;
use crate::protocol::Protocol;
use crate::zone;

/// nginx's `zone NAME [SIZE];` in an `upstream {}` of either protocol, seen
/// first: a name that is the zone of a `consul_upstream` upstream is refused
/// (nginx would share that zone, or refuse it less clearly); every other goes
/// on to nginx.
pub unsafe extern "C" fn zone<P: Protocol>(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed.
    let cf = unsafe { &mut *cf };
    super::directive_result(cf, |cf| {
        let theirs = NginxHandler::find::<P>(cf, P::ZONE_MODULE, "zone")?;
        // SAFETY: cf.args holds the directive's words (nginx checked their count).
        let args = unsafe { (*cf.args).as_slice::<ngx_str_t>() };
        if let Some(name) = args.get(1).map(|a| a.as_bytes()) {
            if zone::is_ours(cf, name) {
                let name = String::from_utf8_lossy(name);
                let owner = UpstreamKey::from_zone_name(&name)
                    .map_or_else(|| format!("upstream \"{name}\""), |k| k.to_string());
                return Err(format!(
                    "zone \"{name}\" is the zone of \"consul_upstream\" in {owner}: choose another name"
                ));
            }
        }
        Ok(theirs.call::<P>(cf))
    })
}
