//! The control plane of claude-agent-http.
//!
//! Data flows one way: request → [`auth`] → [`api`] handlers → [`store`] (and,
//! with the worker and chat issues, the supervisor → worker → CLI), and
//! events come back the same path. [`app::App`] builds everything in one
//! place; `main` only parses the command line ([`cli`]).

pub mod api;
pub mod app;
pub mod auth;
pub mod chat;
pub mod cli;
pub mod config;
pub mod store;
pub mod userdir;
pub mod workers;
