//! Starcite: the session layer for AI products.
//!
//! A session is an ordered, append-only log of events. Appends go through
//! a Raft group ([`consensus`]) and are acknowledged once fsynced; tails
//! replay a session from a cursor and then follow it live ([`tail`]).

pub mod api;
pub mod archive;
pub mod cluster;
pub mod config;
pub mod consensus;
pub mod metrics;
pub mod server;
pub mod session;
pub mod storage;
pub mod tail;
