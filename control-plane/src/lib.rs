//! The control plane of claude-agent-http.
//!
//! Data flows one way: request → [`auth`] → [`api`] handlers → [`store`] and
//! [`chat`] → the supervisor ([`workers`]) → the user's confined worker → the
//! CLI, and events come back the same path. The CLI's model requests go to
//! the [`proxy`], which holds the real credentials. [`app::App`] builds everything in one
//! place; `main` only parses the command line ([`cli`]).

pub mod api;
pub mod app;
pub mod auth;
pub mod chat;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod request_id;
pub mod store;
pub mod stream_json;
pub mod userdir;
pub mod workers;
