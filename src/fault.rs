//! Fault injection for the test suite, in debug builds only (release builds
//! compile it to nothing): `NGX_CONSUL_FAULT=apply,lookup,get` — passed on to
//! the workers with `env NGX_CONSUL_FAULT;` — makes each named step panic the
//! first time it runs in a process, so that the suite can show that a panic
//! ends one step, never a line of discovery or a worker.

#[cfg(debug_assertions)]
pub fn inject(step: &str) {
    use std::cell::RefCell;
    thread_local! {
        static FIRED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }
    let Ok(spec) = std::env::var("NGX_CONSUL_FAULT") else {
        return;
    };
    if !spec.split(',').any(|s| s.trim() == step) {
        return;
    }
    let first = FIRED.with(|f| {
        let mut f = f.borrow_mut();
        let first = !f.iter().any(|s| s == step);
        if first {
            f.push(step.to_string());
        }
        first
    });
    if first {
        panic!("fault injected into {step} (NGX_CONSUL_FAULT)");
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn inject(_step: &str) {}
