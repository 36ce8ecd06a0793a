//! Local-socket transport for pypool (Unix domain sockets / Windows named pipes).
//!
//! Not implemented yet: it will provide a [`pool_core::Launcher`] whose workers connect back to a
//! per-pool socket and authenticate before their handshake.
