//! hickory's runtime on nginx's event loop: tasks run on ngx-rust's executor,
//! timers are nginx timers, sockets are nginx connections. Discovery thus adds no
//! thread to the worker: a second thread would switch glibc (malloc, system call
//! wrappers) and the kernel (file table) to their multi-thread paths for every
//! connection the worker proxies.
//!
//! Two guarantees ngx-rust's executor does not give alone are added by [`spawn`]:
//! - a wake never runs the woken task inside the waker's call. ngx-rust runs a task
//!   at once when it is woken from outside, but hickory wakes while holding locks
//!   the woken task takes (futures_util's `Mutex` wakes a waiter with its waiter
//!   list locked): every wake is deferred to a posted event instead, queued on
//!   `ngx_posted_next_events` like ngx-rust's own, so a task that keeps waking
//!   itself cannot run ahead of proxied I/O;
//! - a panic ends its task (logged) instead of crossing into nginx.
//!
//! Every DNS socket and every background task hickory starts is registered here,
//! and [`shutdown`] closes and drops whatever is left (as `ngx_resolver_cleanup`
//! does for nginx's resolver) when discovery stops with its cycle.
//!
//! Everything here runs on the worker's only thread. hickory's bounds ask for
//! Send and Sync; the impls satisfy them on that ground.
//!
//! This file holds the task shim ([`spawn`], deferred wakes, [`shutdown`],
//! [`with_timeout`]); `provider.rs` hickory's `RuntimeProvider` (spawn handle,
//! timers, connect and bind); `socket.rs` the [`Socket`] over an nginx connection.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::{poll_fn, Future};
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use ngx::async_::Task;
use ngx::ffi::{
    ngx_close_connection, ngx_connection_t, ngx_delete_posted_event, ngx_event_t, ngx_post_event,
    ngx_posted_next_events,
};

use crate::{ffi, log};

mod provider;
mod socket;

pub use provider::NgxRuntime;
pub use socket::Socket;

/// What `ngx_event_ident` reads through an event's `data` in nginx's debug
/// lines: something laid out like the start of a connection (data, read, write,
/// fd). Events here point at this.
static EVENT_IDENT: [usize; 4] = [0, 0, 0, 0x434f_4e53]; // "CONS"

fn event_ident() -> *mut c_void {
    EVENT_IDENT.as_ptr() as *mut c_void
}

thread_local! {
    /// hickory's background tasks (one per DNS connection), until they end.
    static BACKGROUND: RefCell<Vec<Task<()>>> = const { RefCell::new(Vec::new()) };
    /// Every open DNS socket.
    static SOCKETS: RefCell<Vec<NonNull<ngx_connection_t>>> = const { RefCell::new(Vec::new()) };
}

/// Starts `future` as a task on ngx-rust's executor, with deferred wakes and
/// panics contained (see the module's documentation).
pub fn spawn<F: Future<Output = ()> + 'static>(future: F) -> Task<()> {
    ngx::async_::spawn(Guarded::new(future))
}

/// Stops everything the runtime still runs: hickory's background tasks are
/// dropped (their sockets close with them), then any socket left is closed.
pub fn shutdown() {
    let tasks = BACKGROUND.with(|b| std::mem::take(&mut *b.borrow_mut()));
    drop(tasks);
    let left = SOCKETS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for c in left {
        // SAFETY: registered by Socket::open and not closed since (close
        // unregisters); the Socket that owns it will find it gone.
        unsafe { ngx_close_connection(c.as_ptr()) };
    }
}

/// A future whose wakes go through a posted event and whose panic ends it.
struct Guarded<F> {
    future: Pin<Box<F>>,
    wake: Arc<DeferredWake>,
}

impl<F> Guarded<F> {
    fn new(future: F) -> Self {
        Guarded {
            future: Box::pin(future),
            wake: DeferredWake::new(),
        }
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.wake.set_task(cx.waker());
        let waker = Waker::from(self.wake.clone());
        let mut inner = Context::from_waker(&waker);
        let future = self.future.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(&mut inner))) {
            Ok(poll) => poll,
            Err(_) => {
                log::alert!("consul upstream: a discovery task failed (panic); it was stopped");
                Poll::Ready(())
            }
        }
    }
}

/// The waker a guarded future sees: waking posts an event, whose handler wakes
/// the task from the event loop, where no lock of hickory's is held.
struct DeferredWake {
    event: std::cell::UnsafeCell<ngx_event_t>,
    task: Cell<Option<Waker>>,
}

// SAFETY: created, woken and dropped on the worker's event loop thread only; no
// other thread exists in the process to move or share it.
unsafe impl Send for DeferredWake {}
// SAFETY: as above.
unsafe impl Sync for DeferredWake {}

impl DeferredWake {
    fn new() -> Arc<DeferredWake> {
        // SAFETY: an all-zero event is nginx's initial state for an event.
        let mut event: ngx_event_t = unsafe { std::mem::zeroed() };
        event.handler = Some(run_deferred);
        event.data = event_ident();
        Arc::new(DeferredWake {
            event: std::cell::UnsafeCell::new(event),
            task: Cell::new(None),
        })
    }

    fn set_task(&self, waker: &Waker) {
        let old = self.task.take();
        let same = old.as_ref().is_some_and(|w| w.will_wake(waker));
        self.task.set(if same { old } else { Some(waker.clone()) });
    }
}

impl Wake for DeferredWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let ev = self.event.get();
        // SAFETY: the event lives in this Arc, which stays alive while it is
        // posted (Drop unposts it); single thread.
        unsafe {
            if (*ev).posted() == 0 {
                // The cycle's log may change on a reload under master_process off.
                (*ev).log = ffi::cycle_log();
                ngx_post_event(ev, std::ptr::addr_of_mut!(ngx_posted_next_events));
            }
        }
    }
}

impl Drop for DeferredWake {
    fn drop(&mut self) {
        let ev = self.event.get_mut();
        if ev.posted() != 0 {
            // SAFETY: posted by wake_by_ref, still in nginx's posted queue.
            unsafe { ngx_delete_posted_event(ev) };
        }
    }
}

unsafe extern "C" fn run_deferred(ev: *mut ngx_event_t) {
    // SAFETY: ev is the `event` field of a live DeferredWake (posted events are
    // removed before it drops).
    let wake =
        unsafe { &*(ngx::ngx_container_of!(ev, DeferredWake, event) as *const DeferredWake) };
    if let Some(waker) = wake.task.take() {
        // Keep it for the next wake: the task may be woken again before it runs.
        wake.task.set(Some(waker.clone()));
        waker.wake();
    }
}

/// `future`, or a TimedOut error once `duration` has passed.
pub async fn with_timeout<F: Future>(duration: Duration, future: F) -> io::Result<F::Output> {
    let mut future = pin!(future);
    let mut sleep = pin!(ngx::async_::sleep(duration));
    poll_fn(|cx| {
        if let Poll::Ready(v) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "future timed out",
            )));
        }
        Poll::Pending
    })
    .await
}
