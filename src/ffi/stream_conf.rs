//! Typed access to stream configuration, the twin of ngx's `HttpModuleConfExt`
//! and `HttpModule{Main,Server}Conf` (ngx 0.5 has nothing for stream): the C
//! macros `ngx_stream_conf_get_module_{main,srv}_conf`,
//! `ngx_stream_cycle_get_module_main_conf` and `ngx_stream_conf_upstream_srv_conf`,
//! written once. A module binds its conf types in one `unsafe impl`; call sites
//! then never cast.

use std::ptr::NonNull;

use ngx::ffi::{
    ngx_conf_t, ngx_cycle_t, ngx_module_t, ngx_stream_conf_ctx_t, ngx_stream_module,
    ngx_stream_upstream_main_conf_t, ngx_stream_upstream_module, ngx_stream_upstream_srv_conf_t,
};

/// Something that holds stream module confs.
pub trait StreamModuleConfExt {
    /// # Safety
    /// `T` must be `module`'s main conf type.
    unsafe fn stream_main_conf_unchecked<T>(&self, _module: &ngx_module_t) -> Option<NonNull<T>> {
        None
    }

    /// # Safety
    /// `T` must be `module`'s server conf type.
    unsafe fn stream_server_conf_unchecked<T>(&self, _module: &ngx_module_t) -> Option<NonNull<T>> {
        None
    }
}

impl StreamModuleConfExt for ngx_stream_conf_ctx_t {
    unsafe fn stream_main_conf_unchecked<T>(&self, module: &ngx_module_t) -> Option<NonNull<T>> {
        // SAFETY: a stream conf context has a main conf slot per stream module.
        NonNull::new(unsafe { *self.main_conf.add(module.ctx_index) }.cast())
    }

    unsafe fn stream_server_conf_unchecked<T>(&self, module: &ngx_module_t) -> Option<NonNull<T>> {
        // SAFETY: as above, a server conf slot per stream module.
        NonNull::new(unsafe { *self.srv_conf.add(module.ctx_index) }.cast())
    }
}

/// The configuration being parsed: valid inside `stream {}` only (the caller's
/// directive or callback belongs to a stream module).
impl StreamModuleConfExt for ngx_conf_t {
    unsafe fn stream_main_conf_unchecked<T>(&self, module: &ngx_module_t) -> Option<NonNull<T>> {
        let ctx = self.ctx.cast::<ngx_stream_conf_ctx_t>();
        // SAFETY: inside stream {}, cf.ctx is a stream conf context.
        unsafe { ctx.as_ref()?.stream_main_conf_unchecked(module) }
    }

    unsafe fn stream_server_conf_unchecked<T>(&self, module: &ngx_module_t) -> Option<NonNull<T>> {
        let ctx = self.ctx.cast::<ngx_stream_conf_ctx_t>();
        // SAFETY: as above.
        unsafe { ctx.as_ref()?.stream_server_conf_unchecked(module) }
    }
}

/// A configured cycle: its `stream {}` main confs (none without `stream {}`).
impl StreamModuleConfExt for ngx_cycle_t {
    unsafe fn stream_main_conf_unchecked<T>(&self, module: &ngx_module_t) -> Option<NonNull<T>> {
        // SAFETY: conf_ctx has a slot per core module; stream's is null without
        // `stream {}`, else a stream conf context.
        let ctx =
            unsafe { *self.conf_ctx.add(ngx_stream_module.index) }.cast::<ngx_stream_conf_ctx_t>();
        // SAFETY: as above.
        unsafe { ctx.as_ref()?.stream_main_conf_unchecked(module) }
    }
}

/// An upstream block: its modules' server confs (none for an implicit upstream).
impl StreamModuleConfExt for ngx_stream_upstream_srv_conf_t {
    unsafe fn stream_server_conf_unchecked<T>(&self, module: &ngx_module_t) -> Option<NonNull<T>> {
        if self.srv_conf.is_null() {
            return None;
        }
        // SAFETY: an explicit block's srv_conf has a slot per stream module.
        NonNull::new(unsafe { *self.srv_conf.add(module.ctx_index) }.cast())
    }
}

/// A stream module and its main conf type.
///
/// # Safety
/// `MainConf` must be the type the module's `create_main_conf` makes.
pub unsafe trait StreamModuleMainConf {
    type MainConf;

    fn module() -> &'static ngx_module_t;

    fn main_conf(o: &impl StreamModuleConfExt) -> Option<&'static Self::MainConf> {
        // SAFETY: per the trait's contract; confs live as long as their cycle.
        Some(unsafe { o.stream_main_conf_unchecked(Self::module())?.as_ref() })
    }
}

/// A stream module and its server conf type.
///
/// # Safety
/// `SrvConf` must be the type the module's `create_srv_conf` makes.
pub unsafe trait StreamModuleSrvConf {
    type SrvConf;

    fn module() -> &'static ngx_module_t;

    /// Mutable: the module's own code holds no other reference to a block's
    /// conf while it changes it (configuration time, or one callback).
    fn server_conf_mut(o: &impl StreamModuleConfExt) -> Option<&'static mut Self::SrvConf> {
        // SAFETY: per the trait's contract; confs live as long as their cycle.
        Some(unsafe { o.stream_server_conf_unchecked(Self::module())?.as_mut() })
    }
}

/// nginx's `ngx_stream_upstream_module`.
pub struct NgxStreamUpstreamModule;

// SAFETY: the upstream module's confs, as ngx_stream_upstream.c creates them.
unsafe impl StreamModuleMainConf for NgxStreamUpstreamModule {
    type MainConf = ngx_stream_upstream_main_conf_t;

    fn module() -> &'static ngx_module_t {
        // SAFETY: nginx's static module; its indexes are set before any conf exists.
        unsafe { &*std::ptr::addr_of!(ngx_stream_upstream_module) }
    }
}

// SAFETY: as above.
unsafe impl StreamModuleSrvConf for NgxStreamUpstreamModule {
    type SrvConf = ngx_stream_upstream_srv_conf_t;

    fn module() -> &'static ngx_module_t {
        <Self as StreamModuleMainConf>::module()
    }
}
