//! TLS sessions to discovered peers (`proxy_ssl on`), kept by each worker as
//! nginx's round robin keeps them for the servers of an upstream without `zone`:
//! one session per peer, offered on the next connection to that peer and
//! replaced by the session that connection brings back.
//!
//! A session belongs to one peer's tenure of its zone slot (slot number and
//! epoch): a peer that leaves the set, changes address, or leaves and comes back
//! holds its slot under another epoch, so a session is never offered to any
//! peer but the one that issued it, and the sessions of peers that left are
//! freed when the worker takes the new set. `proxy_ssl_session_reuse off` is
//! nginx's: it then calls neither hook.

use std::ptr;

use ngx::ffi::{ngx_connection_t, SSL_SESSION_free, SSL_get1_session, SSL_SESSION};

use consul_core::view::SlotRef;

/// A session and the slot epoch of the peer it came from.
struct Kept {
    epoch: u32,
    session: *mut SSL_SESSION,
}

/// One worker's sessions for the discovered peers of one upstream, by slot number.
#[derive(Default)]
pub struct Sessions {
    by_slot: Vec<Option<Kept>>,
}

fn free(kept: Kept) {
    // SAFETY: `session` is a reference this store owns (from SSL_get1_session),
    // given up exactly once, here.
    unsafe { SSL_SESSION_free(kept.session) };
}

impl Sessions {
    /// The session kept for the peer of `slot`, or null. Borrowed: nginx's
    /// `ngx_ssl_set_session` takes its own reference.
    pub fn get(&self, slot: &SlotRef<'_>) -> *mut SSL_SESSION {
        match self.by_slot.get(slot.index as usize) {
            Some(Some(kept)) if kept.epoch == slot.epoch => kept.session,
            _ => ptr::null_mut(),
        }
    }

    /// Keeps the session of `c` (a TLS connection to the peer of `slot`) in place
    /// of the one kept so far. Nothing is kept for a peer that has left since it
    /// was picked.
    pub fn save(&mut self, slot: &SlotRef<'_>, c: &ngx_connection_t) -> *mut SSL_SESSION {
        if c.ssl.is_null() || !slot.current() {
            return ptr::null_mut();
        }
        // SAFETY: c.ssl is the connection's live TLS state (nginx calls
        // save_session from its TLS callbacks, with the handshake done).
        let session = unsafe { SSL_get1_session((*c.ssl).connection) };
        if session.is_null() {
            return session;
        }
        let at = slot.index as usize;
        if self.by_slot.len() <= at {
            self.by_slot.resize_with(at + 1, || None);
        }
        let old = self.by_slot[at].replace(Kept {
            epoch: slot.epoch,
            session,
        });
        if let Some(old) = old {
            free(old);
        }
        session
    }

    /// Frees the sessions of peers that are not in `current` (slot number and
    /// epoch of every peer of the worker's new set).
    pub fn retain(&mut self, current: impl Iterator<Item = (u32, u32)>) {
        if self.by_slot.iter().all(Option::is_none) {
            return;
        }
        let mut epoch_of: Vec<Option<u32>> = vec![None; self.by_slot.len()];
        for (index, epoch) in current {
            if let Some(e) = epoch_of.get_mut(index as usize) {
                *e = Some(epoch);
            }
        }
        for (entry, epoch) in self.by_slot.iter_mut().zip(epoch_of) {
            if entry.as_ref().is_some_and(|k| Some(k.epoch) != epoch) {
                if let Some(old) = entry.take() {
                    free(old);
                }
            }
        }
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        for kept in self.by_slot.drain(..).flatten() {
            free(kept);
        }
    }
}

/// `set_session` for a discovered peer: the worker's session of the peer of
/// `slot`, if it kept one.
pub fn set_peer_session(
    pc: &mut ngx::ffi::ngx_peer_connection_t,
    up: *const crate::upstream::Upstream,
    slot: &SlotRef,
) -> ngx::ffi::ngx_int_t {
    // SAFETY: the upstream conf outlives every session of its cycle.
    let up = unsafe { &*up };
    let Ok(local) = up.local.try_borrow() else {
        return ngx::ffi::NGX_OK as ngx::ffi::ngx_int_t;
    };
    let session = local.sessions.get(slot);
    ngx::ngx_log_debug!(pc.log, "set consul peer session: {:p}", session);
    if session.is_null() {
        return ngx::ffi::NGX_OK as ngx::ffi::ngx_int_t;
    }
    // SAFETY: nginx calls set_session with the peer connection's TLS state just
    // created; the session stays alive (the store holds a reference) while
    // OpenSSL takes its own.
    unsafe { ngx::ffi::ngx_ssl_set_session(pc.connection, session) }
}

/// `save_session` for a discovered peer: keeps the session the connection to
/// the peer of `slot` brought back.
pub fn save_peer_session(
    pc: &mut ngx::ffi::ngx_peer_connection_t,
    up: *const crate::upstream::Upstream,
    slot: &SlotRef,
) {
    // SAFETY: the upstream conf outlives every session of its cycle; nginx calls
    // save_session with the peer's live connection.
    let (up, c) = unsafe { (&*up, pc.connection.as_ref()) };
    let (Some(c), Ok(mut local)) = (c, up.local.try_borrow_mut()) else {
        return;
    };
    let session = local.sessions.save(slot, c);
    ngx::ngx_log_debug!(pc.log, "save consul peer session: {:p}", session);
}
