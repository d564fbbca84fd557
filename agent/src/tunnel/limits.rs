//! Slots for unfinished inbound TLS handshakes on port 15008. A peer is anonymous until its handshake
//! ends, so what it may hold is bounded per source address and for all peers together: a thousand
//! connections that never finish their handshake cost a bounded amount of memory and never keep
//! another peer's handshake from starting.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why no handshake slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotRefused {
    #[error("{0} unfinished TLS handshakes in total (hbone.max_pending_handshakes)")]
    Total(u32),
    #[error(
        "{0} unfinished TLS handshakes from this address (hbone.max_pending_handshakes_per_peer)"
    )]
    Peer(u32),
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_peer: HashMap<IpAddr, u32>,
}

/// The node's handshake slots; shared by every HBONE listener of the agent.
#[derive(Debug)]
pub struct HandshakeSlots {
    max_total: u32,
    max_per_peer: u32,
    counts: Mutex<Counts>,
}

/// One unfinished handshake; dropping it frees the slot.
#[derive(Debug)]
pub struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    peer: IpAddr,
}

impl HandshakeSlots {
    pub fn new(max_total: u32, max_per_peer: u32) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_peer,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Takes a slot for a handshake from `peer`, or says which bound is reached.
    pub fn try_acquire(self: &Arc<Self>, peer: IpAddr) -> Result<HandshakeSlot, SlotRefused> {
        let peer = peer.to_canonical();
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max_total {
            return Err(SlotRefused::Total(self.max_total));
        }
        let n = c.per_peer.entry(peer).or_insert(0);
        if *n >= self.max_per_peer {
            return Err(SlotRefused::Peer(self.max_per_peer));
        }
        *n += 1;
        c.total += 1;
        Ok(HandshakeSlot {
            slots: self.clone(),
            peer,
        })
    }

    /// Unfinished handshakes now.
    pub fn pending(&self) -> u32 {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut c = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_per_peer_and_in_total_and_frees_on_drop() {
        let slots = HandshakeSlots::new(3, 2);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let c: IpAddr = "2001:db8::3".parse().unwrap();
        let a1 = slots.try_acquire(a).unwrap();
        let _a2 = slots.try_acquire(a).unwrap();
        assert_eq!(slots.try_acquire(a).unwrap_err(), SlotRefused::Peer(2));
        // The same address seen as IPv4-mapped IPv6 (a dual-stack socket) counts as the same peer.
        let mapped: IpAddr = "::ffff:198.51.100.1".parse().unwrap();
        assert_eq!(slots.try_acquire(mapped).unwrap_err(), SlotRefused::Peer(2));
        let _b1 = slots.try_acquire(b).unwrap();
        assert_eq!(slots.try_acquire(c).unwrap_err(), SlotRefused::Total(3));
        assert_eq!(slots.pending(), 3);
        drop(a1);
        assert_eq!(slots.pending(), 2);
        let _c1 = slots.try_acquire(c).unwrap();
        assert_eq!(slots.try_acquire(b).unwrap_err(), SlotRefused::Total(3));
    }

    #[test]
    fn a_peer_whose_slots_are_all_freed_is_forgotten() {
        let slots = HandshakeSlots::new(10, 1);
        for i in 0..100u8 {
            let ip = IpAddr::from([203, 0, 113, i]);
            drop(slots.try_acquire(ip).unwrap());
        }
        let counts = slots.counts.lock().unwrap();
        assert!(counts.per_peer.is_empty());
        assert_eq!(counts.total, 0);
    }
}
