//! The egress proxy as the application runs it: a sandbox authenticates with
//! its CLI's model-proxy credential, each user's domain list is the global
//! one unless an admin replaced it, and every decision goes to the audit log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;

use super::ModelProxy;
use super::egress::{EgressDecision, EgressPolicy, EgressProxy};
use crate::config::NetworkConfig;
use crate::store::{EgressEvent, Store};

/// The running egress proxy and the per-user lists it consults.
#[derive(Debug)]
pub struct Egress {
    pub proxy: Arc<EgressProxy>,
    /// User → their own list (`None`: the global one), loaded when a CLI of
    /// theirs starts and updated when an admin changes it.
    user_domains: Arc<RwLock<HashMap<String, Option<Vec<String>>>>>,
}

impl Egress {
    /// Binds the egress proxy (when `network.egress_proxy` is on).
    pub async fn bind(
        network: &NetworkConfig,
        model_proxy: Arc<ModelProxy>,
        store: Arc<dyn Store>,
    ) -> std::io::Result<Option<(Self, TcpListener)>> {
        if !network.egress_proxy {
            return Ok(None);
        }
        let mut resolve_overrides = HashMap::new();
        for (host, addr) in &network.resolve_overrides {
            // Checked when the configuration was loaded.
            if let Ok(addr) = addr.parse::<SocketAddr>() {
                resolve_overrides.insert(host.to_ascii_lowercase(), addr);
            }
        }
        let policy = EgressPolicy {
            allowed_domains: network.allowed_domains.clone(),
            allowed_ports: network.allowed_ports.clone(),
            allow_private_addresses: network.allow_private_addresses,
            resolve_overrides,
            ..EgressPolicy::default()
        };
        let user_domains: Arc<RwLock<HashMap<String, Option<Vec<String>>>>> = Arc::default();
        let lists = user_domains.clone();
        let (proxy, listener) = EgressProxy::bind(
            &network.host,
            network.port,
            policy,
            Arc::new(move |credential: &str| model_proxy.owner_of(credential)),
            Arc::new(move |user: &str| lists.read().ok().and_then(|l| l.get(user).cloned().flatten())),
            Arc::new(move |decision: EgressDecision| audit(&store, decision)),
        )
        .await?;
        Ok(Some((Self { proxy, user_domains }, listener)))
    }

    /// Reads a user's own list from the store (a CLI of theirs starts).
    pub async fn load_user(&self, store: &dyn Store, user_id: &str) {
        match store.get_user(user_id).await {
            Ok(Some(user)) => self.set_user(user_id, user.allowed_domains),
            Ok(None) => {}
            Err(e) => {
                crate::metrics::store_error(&e);
                tracing::warn!(%user_id, error = %e, "cannot read the user's allowed domains");
            }
        }
    }

    /// An admin changed a user's list: it applies to their next request.
    pub fn set_user(&self, user_id: &str, domains: Option<Vec<String>>) {
        if let Ok(mut lists) = self.user_domains.write() {
            lists.insert(user_id.to_owned(), domains);
        }
    }

    /// The user is deleted: their list goes (a user created again with the
    /// same id loads theirs from the store).
    pub fn forget_user(&self, user_id: &str) {
        if let Ok(mut lists) = self.user_domains.write() {
            lists.remove(user_id);
        }
    }
}

/// Writes one decision to the audit log, in the background.
fn audit(store: &Arc<dyn Store>, decision: EgressDecision) {
    if !decision.allowed {
        tracing::info!(
            user_id = %decision.user_id, session_id = %decision.session_id, host = %decision.host,
            port = decision.port, reason = ?decision.reason, "egress refused"
        );
    }
    if decision.user_id.is_empty() {
        // Unauthenticated: nobody to book it to (logged by the proxy).
        return;
    }
    let event = EgressEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        user_id: decision.user_id,
        session_id: decision.session_id,
        at: decision.at,
        method: decision.method,
        host: decision.host.replace('\0', "\u{fffd}"),
        port: i32::from(decision.port),
        allowed: decision.allowed,
        reason: decision.reason,
    };
    let store = store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.record_egress_event(&event).await {
            tracing::warn!(event_id = %event.event_id, error = %e, "cannot record an egress decision");
        }
    });
}
