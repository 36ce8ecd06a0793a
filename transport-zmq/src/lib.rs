//! ZeroMQ transport for pypool: a ROUTER socket in the pool, a DEALER in each local or remote worker.
//!
//! Not implemented yet: it will provide a [`pool_core::Launcher`] for local spawns and remote joins.
