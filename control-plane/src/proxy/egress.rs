//! The egress proxy: the only way from a sandbox to the network.
//!
//! A sandboxed agent may connect only to a few loopback ports, so the CLI
//! and the tools it runs (curl, git, npm, pip, ...) reach the internet
//! through this proxy: they get `HTTPS_PROXY`/`HTTP_PROXY` =
//! [`EgressProxy::proxy_url`], which carries a per-process credential as
//! the proxy user's password (`Proxy-Authorization: Basic
//! base64("cah:<credential>")`). The proxy maps the credential to its user
//! and session, checks the destination against the domain allow-list (the
//! user's own list if they have one, else the global one) and the allowed
//! ports, then tunnels (`CONNECT host:port`) or forwards (`GET
//! http://host/path`); otherwise it answers with a short plain-text 403
//! (refused), 407 (no valid credential) or 502 (upstream unreachable), or
//! 400/408 for a malformed or slow request head. Every request, with or
//! without a valid credential, is reported to the caller's `on_decision`
//! for the audit log (a head that cannot be parsed is not a request).
//!
//! What the allow-list can and cannot promise:
//! - It is a list of *names*. A host given as an IP literal (`1.2.3.4`,
//!   `[::1]`, and the numeric forms resolvers also accept, such as
//!   `2130706433` or `0x7f.1`) is refused unless the list is `*`: otherwise
//!   any allow-list would be bypassed by naming the address instead.
//! - A name's addresses must be public: a name that resolves to loopback,
//!   private, link-local (the cloud metadata service) or other special
//!   addresses is refused, so neither an allowed name nor `*` reaches the
//!   control plane's own ports or the host's network (unless
//!   [`EgressPolicy::allow_private_addresses`]). `resolve_overrides` are the
//!   operator's and are trusted.
//! - HTTPS is tunnelled, not inspected: the proxy sees the `CONNECT` name,
//!   not the TLS SNI or the `Host` inside. Like any non-intercepting proxy it
//!   cannot stop domain fronting through a CDN shared by an allowed name.
//!   For plain HTTP the `Host` sent upstream is always the checked one, and
//!   `Connection: close` ends the upstream connection after one response.
//!
//! One request per client connection: a `CONNECT` becomes a tunnel, a plain
//! request is forwarded with `Connection: close` and the rest of the
//! connection is relayed byte for byte. Credentials are never logged, nor
//! are URL paths (they may carry tokens).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest request head (request line and headers) read.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a client has to send its request head, by default.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Resolving and connecting upstream, all addresses together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One upstream address.
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(4);
/// After an error reply, how long (and how much) the client's unread bytes
/// are drained so that closing does not reset the connection before the
/// client has read the reply.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 256 * 1024;
/// The user name in the proxy URL; the password is the credential.
const PROXY_USER: &str = "cah";
const REALM: &str = "claude-agent-http";

/// Who may go where.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// Host names that may be reached: `example.com` matches `example.com`
    /// and every `*.example.com`; `*.example.com` (or `.example.com`) only
    /// the subdomains; `*` everything, IP literals included. Case and a
    /// trailing dot do not matter; no other wildcards. Empty: nothing.
    pub allowed_domains: Vec<String>,
    /// Destination ports that may be reached (default 80 and 443).
    pub allowed_ports: Vec<u16>,
    /// Whether names may resolve to loopback, private, link-local and other
    /// non-public addresses (default no).
    pub allow_private_addresses: bool,
    /// Host → the address to connect to instead of resolving it (port
    /// included, whatever port the request named). For tests and for
    /// operators pinning a name; trusted, so not subject to the
    /// public-address rule.
    pub resolve_overrides: HashMap<String, SocketAddr>,
    /// How long a client has to send its request head.
    pub head_timeout: Duration,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            allowed_domains: Vec::new(),
            allowed_ports: vec![80, 443],
            allow_private_addresses: false,
            resolve_overrides: HashMap::new(),
            head_timeout: HEAD_TIMEOUT,
        }
    }
}

/// One request the proxy allowed or refused, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EgressDecision {
    /// Empty when the request had no valid credential.
    pub user_id: String,
    /// Empty when the request had no valid credential.
    pub session_id: String,
    /// `CONNECT`, `GET`, ...
    pub method: String,
    /// Normalized: lower case, no trailing dot, IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// Whether the policy let the request through (an allowed request whose
    /// upstream was unreachable is allowed, with a reason).
    pub allowed: bool,
    /// Why it was refused, or what went wrong.
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// Credential → (user, session), `None` for an unknown or expired one.
pub type Authorize = Arc<dyn Fn(&str) -> Option<(String, String)> + Send + Sync>;
/// User → their own allow-list, which replaces the global one.
pub type UserDomains = Arc<dyn Fn(&str) -> Option<Vec<String>> + Send + Sync>;
/// Called for every request, allowed or not, on the connection's task (keep
/// it quick: hand slow work such as database writes to another task).
pub type OnDecision = Arc<dyn Fn(EgressDecision) + Send + Sync>;

/// The proxy's state; cheap to share.
pub struct EgressProxy {
    addr: SocketAddr,
    /// With `resolve_overrides` keyed by normalized host.
    policy: EgressPolicy,
    authorize: Authorize,
    per_user_domains: UserDomains,
    on_decision: OnDecision,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy").field("addr", &self.addr).field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl EgressProxy {
    /// Binds the proxy's listener (meant for loopback).
    pub async fn bind(
        host: &str,
        port: u16,
        mut policy: EgressPolicy,
        authorize: Authorize,
        per_user_domains: UserDomains,
        on_decision: OnDecision,
    ) -> std::io::Result<(Arc<Self>, TcpListener)> {
        let addr = format!("{host}:{port}");
        let context =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("egress proxy: cannot listen on {addr}: {e}"));
        let listener = TcpListener::bind(&addr).await.map_err(context)?;
        let local = listener.local_addr().map_err(context)?;
        policy.resolve_overrides =
            policy.resolve_overrides.into_iter().map(|(host, addr)| (normalize_name(&host), addr)).collect();
        let proxy = Arc::new(Self { addr: local, policy, authorize, per_user_domains, on_decision });
        Ok((proxy, listener))
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The `HTTPS_PROXY`/`HTTP_PROXY` value for a process holding
    /// `credential`: `http://cah:<credential>@127.0.0.1:<port>` (the
    /// credential percent-encoded where it needs to be).
    pub fn proxy_url(&self, credential: &str) -> String {
        let ip = if self.addr.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { self.addr.ip() };
        format!("http://{PROXY_USER}:{}@{}", percent_encode(credential), SocketAddr::new(ip, self.addr.port()))
    }

    /// Serves until `shutdown`; open tunnels end with it.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let (proxy, shutdown) = (self.clone(), shutdown.clone());
                    connections.spawn(async move {
                        tokio::select! {
                            () = shutdown.cancelled() => {}
                            () = proxy.handle(stream) => {}
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: keep serving.
                    tracing::warn!(error = %e, "egress proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        connections.close();
        connections.wait().await;
        Ok(())
    }

    /// One client connection: one request, then a tunnel or a relay.
    async fn handle(&self, mut client: TcpStream) {
        let _ = client.set_nodelay(true);
        let (head, early) = match tokio::time::timeout(self.policy.head_timeout, read_head(&mut client)).await {
            Ok(Ok(head)) => head,
            Ok(Err(HeadError::Closed)) => return,
            Ok(Err(HeadError::Io(e))) => {
                tracing::debug!(error = %e, "egress proxy: reading a request head failed");
                return;
            }
            Ok(Err(HeadError::TooLarge)) => {
                let message = format!("the request head is larger than {} KiB", MAX_HEAD_BYTES / 1024);
                return refuse(client, Status::BadRequest, &message).await;
            }
            Ok(Err(HeadError::Truncated)) => {
                return refuse(client, Status::BadRequest, "the connection ended inside the request head").await;
            }
            Err(_) => return refuse(client, Status::RequestTimeout, "the request head took too long").await,
        };
        let request = match std::str::from_utf8(&head).map_err(|_| "the request head is not UTF-8").and_then(parse_head)
        {
            Ok(request) => request,
            Err(message) => return refuse(client, Status::BadRequest, message).await,
        };
        let mut decision = EgressDecision {
            user_id: String::new(),
            session_id: String::new(),
            method: request.method.clone(),
            host: request.host.clone(),
            port: request.port,
            allowed: false,
            reason: None,
            at: crate::store::now(),
        };

        let Some((user_id, session_id)) = request.credential.as_deref().and_then(|c| (self.authorize)(c)) else {
            // Some clients ask without credentials first; a wrong one is worth a warning.
            if request.credential.is_some() {
                tracing::warn!(host = %request.host, port = request.port, "egress proxy: unknown credential");
            } else {
                tracing::info!(host = %request.host, port = request.port, "egress proxy: no credential");
            }
            decision.reason = Some("missing or invalid proxy credentials".into());
            (self.on_decision)(decision);
            let message = "proxy authentication required: use the proxy URL this session was given";
            return refuse(client, Status::ProxyAuthenticationRequired, message).await;
        };
        decision.user_id = user_id;
        decision.session_id = session_id;

        if let Some(message) = self.refusal(&decision.user_id, &request.host, request.port) {
            return self.deny(client, decision, Status::Forbidden, message).await;
        }
        let mut upstream = match self.connect(&request.host, request.port).await {
            Ok(upstream) => upstream,
            Err(ConnectError::NotPublic) => {
                let message = format!(
                    "{} resolves only to private or local addresses, which this proxy does not reach",
                    request.host
                );
                return self.deny(client, decision, Status::Forbidden, message).await;
            }
            Err(ConnectError::Unreachable(why)) => {
                tracing::info!(user_id = %decision.user_id, host = %request.host, port = request.port, error = %why,
                    "egress proxy: upstream unreachable");
                decision.allowed = true;
                decision.reason = Some(format!("upstream unreachable: {why}"));
                (self.on_decision)(decision);
                let message = format!("cannot reach {}:{}: {why}", request.host, request.port);
                return refuse(client, Status::BadGateway, &message).await;
            }
        };
        let _ = upstream.set_nodelay(true);
        tracing::debug!(user_id = %decision.user_id, session_id = %decision.session_id, method = %decision.method,
            host = %request.host, port = request.port, "egress proxy: allowed");
        decision.allowed = true;
        (self.on_decision)(decision);

        let opened = if request.method == "CONNECT" {
            client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await
        } else {
            upstream.write_all(&request.upstream_head()).await
        };
        // Bytes the client sent after its head: a request body, or a TLS
        // hello sent without waiting for the 200.
        let opened = match opened {
            Ok(()) if !early.is_empty() => upstream.write_all(&early).await,
            other => other,
        };
        if let Err(e) = opened {
            tracing::debug!(error = %e, "egress proxy: opening the relay failed");
            return;
        }
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(host = %request.host, up, down, "egress proxy: relay ended"),
            Err(e) => tracing::debug!(host = %request.host, error = %e, "egress proxy: relay broke off"),
        }
    }

    /// Why the policy refuses `user_id` this destination, if it does.
    fn refusal(&self, user_id: &str, host: &str, port: u16) -> Option<String> {
        let own = (self.per_user_domains)(user_id);
        let domains = own.as_deref().unwrap_or(&self.policy.allowed_domains);
        if !host_allowed(domains, host) {
            if is_ip_literal(host) && !domains.iter().any(|d| d.trim() == "*") {
                return Some(format!(
                    "{host} is an IP address; only host names on the allow-list may be reached through this proxy"
                ));
            }
            return Some(format!("{host} is not on the allow-list of domains this session may reach"));
        }
        if !self.policy.allowed_ports.contains(&port) {
            let ports = self.policy.allowed_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
            return Some(format!("port {port} is not allowed (allowed ports: {ports})"));
        }
        None
    }

    async fn deny(&self, client: TcpStream, mut decision: EgressDecision, status: Status, message: String) {
        tracing::info!(user_id = %decision.user_id, session_id = %decision.session_id, method = %decision.method,
            host = %decision.host, port = decision.port, reason = %message, "egress proxy: refused");
        decision.reason = Some(message.clone());
        (self.on_decision)(decision);
        refuse(client, status, &message).await;
    }

    /// Resolves (overrides first) and connects, to public addresses only
    /// unless the policy says otherwise.
    async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let unreachable = |what: &str| ConnectError::Unreachable(what.to_owned());
        let candidates = match self.policy.resolve_overrides.get(host) {
            Some(addr) => vec![*addr],
            None => {
                let resolved = tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
                    .await
                    .map_err(|_| unreachable("resolving the name timed out"))?
                    .map_err(|_| unreachable("the name does not resolve"))?
                    .collect::<Vec<_>>();
                if resolved.is_empty() {
                    return Err(unreachable("the name has no addresses"));
                }
                let allowed: Vec<_> = resolved
                    .into_iter()
                    .filter(|addr| self.policy.allow_private_addresses || is_public(addr.ip()))
                    .collect();
                if allowed.is_empty() {
                    return Err(ConnectError::NotPublic);
                }
                allowed
            }
        };
        let mut last = unreachable("connecting timed out");
        for addr in candidates {
            let give_up = deadline.min(Instant::now() + ADDRESS_TIMEOUT);
            match tokio::time::timeout_at(give_up, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = ConnectError::Unreachable(e.kind().to_string()),
                Err(_) => last = unreachable("connecting timed out"),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(last)
    }
}

/// Whether `host` is on `patterns` (see [`EgressPolicy::allowed_domains`]).
/// IP literals match only `*`.
pub fn host_allowed(patterns: &[String], host: &str) -> bool {
    let host = normalize_name(host);
    let ip = is_ip_literal(&host);
    patterns.iter().any(|pattern| {
        // Exactly `*`: a stray `*.` must not become everything.
        if pattern.trim() == "*" {
            return true;
        }
        let pattern = normalize_name(pattern.trim());
        if ip || pattern.is_empty() {
            return false;
        }
        match pattern.strip_prefix("*.").or_else(|| pattern.strip_prefix('.')) {
            Some(suffix) => is_subdomain(&host, suffix),
            None => host == pattern || is_subdomain(&host, &pattern),
        }
    })
}

/// `host` is strictly below `domain`.
fn is_subdomain(host: &str, domain: &str) -> bool {
    !domain.is_empty()
        && host.len() > domain.len() + 1
        && host.ends_with(domain)
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
}

/// Lower case, without the trailing dot of a fully qualified name.
fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// An address rather than a name, including the forms `getaddrinfo` reads
/// as IPv4 (`2130706433`, `127.1`, `0x7f.0.0.1`): a name whose last label
/// is numeric (no top-level domain is) is taken for one, as browsers do.
fn is_ip_literal(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    let hex = last.strip_prefix("0x").is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// A globally routable address: not loopback, private, link-local, shared,
/// multicast, documentation or otherwise reserved.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) embeds an IPv4 address.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [.., a, b, c, d] = v6.octets();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || (segments[0] & 0xffc0) == 0xfec0 // site-local
                || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
                || segments[..5] == [0; 5]) // IPv4-compatible and other reserved ::/80
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0 // "this network"
        || (a == 100 && (b & 0xc0) == 64) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || a >= 240) // reserved
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[derive(Debug)]
enum ConnectError {
    /// The name resolves only to addresses the policy keeps out.
    NotPublic,
    Unreachable(String),
}

#[derive(Debug)]
enum HeadError {
    /// The client left before sending anything.
    Closed,
    Truncated,
    TooLarge,
    Io(std::io::Error),
}

/// Reads up to the blank line ending the head: the head without that line,
/// and whatever the client sent after it.
async fn read_head<R: AsyncRead + Unpin>(stream: &mut R) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    const CHUNK: usize = 4096;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; CHUNK];
    loop {
        let room = MAX_HEAD_BYTES - buf.len();
        if room == 0 {
            return Err(HeadError::TooLarge);
        }
        let n = stream.read(&mut chunk[..room.min(CHUNK)]).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() { HeadError::Closed } else { HeadError::Truncated });
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at;
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            return Ok((buf, rest));
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
struct ProxyRequest {
    method: String,
    version: String,
    /// Normalized (see [`EgressDecision::host`]).
    host: String,
    port: u16,
    /// Origin-form path and query; `None` for `CONNECT`.
    path: Option<String>,
    headers: Vec<(String, String)>,
    /// The password of a `Basic` `Proxy-Authorization` for user `cah`.
    credential: Option<String>,
}

impl ProxyRequest {
    /// The head sent upstream for a plain request: origin-form, the checked
    /// `Host`, no hop-by-hop headers, `Connection: close`.
    fn upstream_head(&self) -> Vec<u8> {
        let path = self.path.as_deref().unwrap_or("/");
        let mut head = format!("{} {path} {}\r\n", self.method, self.version);
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == 80 {
            let _ = write!(head, "Host: {host}\r\n");
        } else {
            let _ = write!(head, "Host: {host}:{}\r\n", self.port);
        }
        // Headers the client named in Connection are hop-by-hop too (but
        // never the body's framing).
        let listed: Vec<String> = self
            .headers
            .iter()
            .filter(|(name, _)| {
                name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("proxy-connection")
            })
            .flat_map(|(_, value)| value.split(',').map(|t| t.trim().to_ascii_lowercase()))
            .filter(|t| t != "content-length" && t != "transfer-encoding")
            .collect();
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            // `Host` is set from the checked URL; `Transfer-Encoding` is kept:
            // the body is relayed as is.
            if super::HOP_BY_HOP.contains(&lower.as_str()) || lower == "host" || listed.contains(&lower) {
                continue;
            }
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("Connection: close\r\n\r\n");
        head.into_bytes()
    }
}

/// Parses a request head (without its final blank line): `CONNECT
/// host:port` or an absolute `http://` URL, HTTP/1.0 or 1.1.
fn parse_head(head: &str) -> Result<ProxyRequest, &'static str> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    if request_line.bytes().any(|b| b.is_ascii_control()) {
        return Err("malformed request line");
    }
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if method.is_empty() || !method.bytes().all(is_tchar) || target.is_empty() {
        return Err("malformed request line");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err("unsupported HTTP version");
    }

    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err("folded header lines are not accepted");
        }
        let (name, value) = line.split_once(':').ok_or("malformed header line")?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err("malformed header name");
        }
        if value.bytes().any(|b| b != b'\t' && b.is_ascii_control()) {
            return Err("control characters in a header value");
        }
        headers.push((name.to_owned(), value.trim_matches([' ', '\t']).to_owned()));
    }

    let (host, port, path) = if method == "CONNECT" {
        let (host, port) = parse_authority(target, None)?;
        (host, port, None)
    } else {
        let Some(rest) = strip_prefix_ignore_case(target, "http://") else {
            return Err(if target.starts_with('/') {
                "this is a proxy: send an absolute http:// URL, or CONNECT"
            } else if strip_prefix_ignore_case(target, "https://").is_some() {
                "https:// URLs go through CONNECT"
            } else {
                "only http:// URLs can be forwarded"
            });
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let (host, port) = parse_authority(authority, Some(80))?;
        let path = path.split('#').next().unwrap_or_default();
        let path = match path.chars().next() {
            None => "/".to_owned(),
            Some('?') => format!("/{path}"),
            Some(_) => path.to_owned(),
        };
        check_framing(&headers)?;
        (host, port, Some(path))
    };

    let credential = proxy_credential(&headers);
    Ok(ProxyRequest { method: method.to_owned(), version: version.to_owned(), host, port, path, headers, credential })
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.get(..prefix.len()).filter(|head| head.eq_ignore_ascii_case(prefix)).map(|_| &s[prefix.len()..])
}

/// A body's length must be unambiguous, or the upstream could read a second
/// request from it.
fn check_framing(headers: &[(String, String)]) -> Result<(), &'static str> {
    let encoded = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    let mut lengths = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")).map(|(_, v)| v);
    if let Some(first) = lengths.next() {
        if encoded {
            return Err("both Content-Length and Transfer-Encoding");
        }
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) || lengths.any(|other| other != first) {
            return Err("invalid Content-Length");
        }
    }
    Ok(())
}

/// `host:port` (port required unless `default_port`), `[v6]:port`; no
/// user info. The host comes back normalized.
fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), &'static str> {
    if authority.contains('@') {
        return Err("credentials in the URL are not accepted");
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or("malformed IPv6 address")?;
        let v6 = v6.parse::<Ipv6Addr>().map_err(|_| "malformed IPv6 address")?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or("malformed authority")?),
        };
        (v6.to_string(), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let host = normalize_name(host);
        let valid_label =
            |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if host.len() > 253 || !host.split('.').all(valid_label) {
            return Err("malformed host name");
        }
        (host, port)
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().ok().filter(|&p| p != 0).ok_or("malformed port")?
        }
        Some(_) => return Err("malformed port"),
        None => default_port.ok_or("CONNECT needs host:port")?,
    };
    Ok((host, port))
}

/// The password of the one `Proxy-Authorization: Basic` header, if its
/// user is `cah`.
fn proxy_credential(headers: &[(String, String)]) -> Option<String> {
    let mut values = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("proxy-authorization")).map(|(_, v)| v);
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    (user == PROXY_USER && !password.is_empty()).then(|| password.to_owned())
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[derive(Debug, Clone, Copy)]
enum Status {
    BadRequest,
    Forbidden,
    ProxyAuthenticationRequired,
    RequestTimeout,
    BadGateway,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Self::BadRequest => "400 Bad Request",
            Self::Forbidden => "403 Forbidden",
            Self::ProxyAuthenticationRequired => "407 Proxy Authentication Required",
            Self::RequestTimeout => "408 Request Timeout",
            Self::BadGateway => "502 Bad Gateway",
        }
    }
}

/// Answers with a short plain-text error and closes the connection.
async fn refuse(mut client: TcpStream, status: Status, message: &str) {
    let body = format!("claude-agent-http egress proxy: {message}\n");
    let mut response = format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        status.line(),
        body.len()
    );
    if matches!(status, Status::ProxyAuthenticationRequired) {
        let _ = write!(response, "Proxy-Authenticate: Basic realm=\"{REALM}\"\r\n");
    }
    response.push_str("\r\n");
    response.push_str(&body);
    if client.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    // Closing with unread bytes (a refused request's body) would reset the
    // connection, and the client might never read the answer.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const ALICE: &str = "alice-credential";
    const BOB: &str = "bob-credential";

    struct Harness {
        proxy: Arc<EgressProxy>,
        decisions: Arc<Mutex<Vec<EgressDecision>>>,
        shutdown: CancellationToken,
        served: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Harness {
        fn decisions(&self) -> Vec<EgressDecision> {
            self.decisions.lock().expect("decisions").clone()
        }

        /// Sends `request` raw and reads the whole answer.
        async fn exchange(&self, request: &[u8]) -> String {
            let mut stream = TcpStream::connect(("127.0.0.1", self.proxy.port())).await.expect("connect to the proxy");
            stream.write_all(request).await.expect("send");
            read_to_end(&mut stream).await
        }
    }

    async fn read_to_end(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the answer came in time")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A proxy allowing `domains`; alice and bob are known, bob has his own
    /// list when `bob_domains` is given.
    async fn start(policy: EgressPolicy, bob_domains: Option<Vec<String>>) -> Harness {
        let decisions = Arc::new(Mutex::new(Vec::new()));
        let recorded = decisions.clone();
        let authorize: Authorize = Arc::new(|credential| match credential {
            ALICE => Some(("alice".to_owned(), "session-a".to_owned())),
            BOB => Some(("bob".to_owned(), "session-b".to_owned())),
            _ => None,
        });
        let per_user: UserDomains = Arc::new(move |user| if user == "bob" { bob_domains.clone() } else { None });
        let on_decision: OnDecision = Arc::new(move |d| recorded.lock().expect("decisions").push(d));
        let (proxy, listener) =
            EgressProxy::bind("127.0.0.1", 0, policy, authorize, per_user, on_decision).await.expect("bind");
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(proxy.clone().serve(listener, shutdown.clone()));
        Harness { proxy, decisions, shutdown, served }
    }

    fn policy(domains: &[&str], overrides: &[(&str, SocketAddr)]) -> EgressPolicy {
        EgressPolicy {
            allowed_domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            resolve_overrides: overrides.iter().map(|(h, a)| ((*h).to_owned(), *a)).collect(),
            ..EgressPolicy::default()
        }
    }

    fn auth(credential: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("cah:{credential}"));
        format!("Proxy-Authorization: Basic {encoded}\r\n")
    }

    fn connect_request(target: &str, credential: &str) -> Vec<u8> {
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\n", auth(credential)).into_bytes()
    }

    /// A TCP echo server.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                });
            }
        });
        addr
    }

    /// An HTTP server answering `hello from <path>`; sends each request
    /// head it receives.
    async fn http_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let addr = listener.local_addr().expect("http addr");
        let (heads, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let heads = heads.clone();
                tokio::spawn(async move {
                    let Ok((head, _)) = read_head(&mut stream).await else { return };
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                    let _ = heads.send(head);
                    let body = format!("hello from {path}");
                    let response =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (addr, received)
    }

    /// An address nothing listens on.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    }

    fn status(response: &str) -> &str {
        response.split("\r\n").next().unwrap_or_default()
    }

    #[tokio::test]
    async fn connect_to_an_allowed_host_tunnels_both_ways() {
        let echo = echo_server().await;
        let h = start(policy(&["allowed.test"], &[("allowed.test", echo)]), None).await;
        let mut stream = TcpStream::connect(("127.0.0.1", h.proxy.port())).await.expect("connect");
        stream.write_all(&connect_request("allowed.test:443", ALICE)).await.expect("send");
        let expected = b"HTTP/1.1 200 Connection Established\r\n\r\n";
        let mut answer = vec![0; expected.len()];
        stream.read_exact(&mut answer).await.expect("answer");
        assert_eq!(answer, expected);
        for message in [&b"ping"[..], b"a longer message, both ways"] {
            stream.write_all(message).await.expect("write");
            let mut back = vec![0; message.len()];
            stream.read_exact(&mut back).await.expect("echo");
            assert_eq!(back, message);
        }
        drop(stream);
        let decisions = h.decisions();
        assert_eq!(decisions.len(), 1);
        let d = &decisions[0];
        assert_eq!((d.user_id.as_str(), d.session_id.as_str(), d.method.as_str()), ("alice", "session-a", "CONNECT"));
        assert_eq!((d.host.as_str(), d.port, d.allowed, &d.reason), ("allowed.test", 443, true, &None));
    }

    #[tokio::test]
    async fn bytes_sent_before_the_200_reach_the_upstream() {
        let echo = echo_server().await;
        let h = start(policy(&["allowed.test"], &[("allowed.test", echo)]), None).await;
        let mut stream = TcpStream::connect(("127.0.0.1", h.proxy.port())).await.expect("connect");
        let mut request = connect_request("allowed.test:443", ALICE);
        request.extend_from_slice(b"early");
        stream.write_all(&request).await.expect("send");
        let mut answer = vec![0; b"HTTP/1.1 200 Connection Established\r\n\r\nearly".len()];
        stream.read_exact(&mut answer).await.expect("answer");
        assert!(answer.ends_with(b"\r\n\r\nearly"), "{}", String::from_utf8_lossy(&answer));
    }

    #[tokio::test]
    async fn a_host_off_the_list_gets_403_naming_it() {
        let echo = echo_server().await;
        let h = start(policy(&["allowed.test"], &[("allowed.test", echo), ("denied.test", echo)]), None).await;
        let response = h.exchange(&connect_request("denied.test:443", ALICE)).await;
        assert_eq!(status(&response), "HTTP/1.1 403 Forbidden");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(body.contains("denied.test is not on the allow-list"), "{body}");
        assert!(response.contains(&format!("Content-Length: {}\r\n", body.len())), "{response}");
        let decisions = h.decisions();
        assert_eq!(decisions.len(), 1);
        assert!(!decisions[0].allowed);
        assert_eq!((decisions[0].user_id.as_str(), decisions[0].host.as_str()), ("alice", "denied.test"));
        assert!(decisions[0].reason.as_deref().is_some_and(|r| r.contains("allow-list")));
    }

    #[tokio::test]
    async fn missing_or_wrong_credentials_get_407() {
        let echo = echo_server().await;
        let h = start(policy(&["allowed.test"], &[("allowed.test", echo)]), None).await;
        let basic = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let requests = [
            "CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n".to_owned(),
            String::from_utf8(connect_request("allowed.test:443", "wrong")).expect("utf-8"),
            format!(
                "CONNECT allowed.test:443 HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
                basic("bob:alice-credential")
            ),
            format!("CONNECT allowed.test:443 HTTP/1.1\r\nProxy-Authorization: Bearer {ALICE}\r\n\r\n"),
            "CONNECT allowed.test:443 HTTP/1.1\r\nProxy-Authorization: Basic !!!\r\n\r\n".to_owned(),
            format!("GET http://allowed.test/ HTTP/1.1\r\n{}{}\r\n", auth(ALICE), auth(BOB)),
        ];
        for request in &requests {
            let response = h.exchange(request.as_bytes()).await;
            assert_eq!(status(&response), "HTTP/1.1 407 Proxy Authentication Required", "{request}");
            assert!(response.contains("\r\nProxy-Authenticate: Basic realm=\"claude-agent-http\"\r\n"), "{response}");
            assert!(!response.contains(ALICE), "the credential is never echoed");
        }
        let decisions = h.decisions();
        assert_eq!(decisions.len(), requests.len());
        assert!(decisions.iter().all(|d| !d.allowed && d.user_id.is_empty() && d.session_id.is_empty()));
    }

    #[tokio::test]
    async fn ip_literals_are_refused_unless_everything_is_allowed() {
        let echo = echo_server().await;
        let h = start(policy(&["allowed.test", "127.0.0.1"], &[("allowed.test", echo)]), None).await;
        for target in ["127.0.0.1:443", "[::1]:443", "2130706433:443", "0x7f.1:443", "1.2.3.4:80"] {
            let response = h.exchange(&connect_request(target, ALICE)).await;
            assert_eq!(status(&response), "HTTP/1.1 403 Forbidden", "{target}");
            assert!(response.contains("is an IP address"), "{response}");
        }
        assert!(h.decisions().iter().all(|d| !d.allowed));
        assert!(host_allowed(&["*".to_owned()], "1.2.3.4"));
        assert!(host_allowed(&["*".to_owned()], "::1"));
        assert!(!host_allowed(&["1.2.3.4".to_owned()], "1.2.3.4"));
    }

    #[tokio::test]
    async fn only_allowed_ports() {
        let echo = echo_server().await;
        let h = start(policy(&["allowed.test"], &[("allowed.test", echo)]), None).await;
        let response = h.exchange(&connect_request("allowed.test:22", ALICE)).await;
        assert_eq!(status(&response), "HTTP/1.1 403 Forbidden");
        assert!(response.contains("port 22 is not allowed (allowed ports: 80, 443)"), "{response}");
        let decisions = h.decisions();
        assert_eq!((decisions[0].port, decisions[0].allowed), (22, false));
    }

    #[tokio::test]
    async fn plain_http_is_forwarded_in_origin_form_without_proxy_headers() {
        let (server, mut heads) = http_server().await;
        let h = start(policy(&["allowed.test"], &[("allowed.test", server)]), None).await;
        let request = format!(
            "GET http://Allowed.Test./hello?x=1 HTTP/1.1\r\nHost: evil.test\r\nUser-Agent: t\r\n{}Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\r\n",
            auth(ALICE)
        );
        let response = h.exchange(request.as_bytes()).await;
        assert_eq!(status(&response), "HTTP/1.1 200 OK");
        assert!(response.ends_with("\r\n\r\nhello from /hello?x=1"), "{response}");
        let head = heads.recv().await.expect("the server got the request");
        assert_eq!(head, "GET /hello?x=1 HTTP/1.1\r\nHost: allowed.test\r\nUser-Agent: t\r\nConnection: close");
        let d = &h.decisions()[0];
        assert_eq!((d.method.as_str(), d.host.as_str(), d.port, d.allowed), ("GET", "allowed.test", 80, true));

        // A body sent with the head goes along.
        let request = format!("POST http://allowed.test:80 HTTP/1.1\r\nContent-Length: 4\r\n{}\r\nbody", auth(ALICE));
        let response = h.exchange(request.as_bytes()).await;
        assert!(response.ends_with("hello from /"), "{response}");
        let head = heads.recv().await.expect("the server got the request");
        assert!(head.starts_with("POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 4\r\n"), "{head}");

        let request = format!("GET http://denied.test/ HTTP/1.1\r\n{}\r\n", auth(ALICE));
        let response = h.exchange(request.as_bytes()).await;
        assert_eq!(status(&response), "HTTP/1.1 403 Forbidden");
        assert!(response.contains("denied.test is not on the allow-list"));
    }

    #[tokio::test]
    async fn a_real_client_goes_through_the_proxy() {
        let (server, _heads) = http_server().await;
        let h = start(policy(&["allowed.test"], &[("allowed.test", server)]), None).await;
        let proxy = reqwest::Proxy::all(h.proxy.proxy_url(ALICE)).expect("proxy url");
        let client = reqwest::Client::builder().proxy(proxy).build().expect("client");
        let response = client.get("http://allowed.test/hello").send().await.expect("send");
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.expect("body"), "hello from /hello");
        let response = client.get("http://denied.test/").send().await.expect("send");
        assert_eq!(response.status(), 403);

        let proxy = reqwest::Proxy::all(h.proxy.proxy_url("wrong")).expect("proxy url");
        let client = reqwest::Client::builder().proxy(proxy).build().expect("client");
        let response = client.get("http://allowed.test/hello").send().await.expect("send");
        assert_eq!(response.status(), 407);
    }

    #[test]
    fn subdomain_rules() {
        let list = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let plain = list(&["example.com"]);
        assert!(host_allowed(&plain, "example.com"));
        assert!(host_allowed(&plain, "api.example.com"));
        assert!(host_allowed(&plain, "a.b.Example.COM."));
        assert!(!host_allowed(&plain, "notexample.com"));
        assert!(!host_allowed(&plain, "example.com.evil.test"));
        assert!(!host_allowed(&plain, "com"));
        let subs = list(&["*.x.org", ".y.org"]);
        assert!(host_allowed(&subs, "a.x.org"));
        assert!(host_allowed(&subs, "a.b.x.org"));
        assert!(!host_allowed(&subs, "x.org"));
        assert!(!host_allowed(&subs, "evilx.org"));
        assert!(host_allowed(&subs, "a.y.org"));
        assert!(!host_allowed(&subs, "y.org"));
        assert!(host_allowed(&list(&[" Example.COM. "]), "example.com"));
        assert!(host_allowed(&list(&["*"]), "anything.test"));
        assert!(!host_allowed(&list(&[]), "example.com"));
        assert!(!host_allowed(&list(&["", "*."]), "example.com"));
        assert!(!host_allowed(&list(&["foo.*.com"]), "foo.bar.com"));
    }

    #[tokio::test]
    async fn subdomains_through_the_proxy() {
        let echo = echo_server().await;
        let overrides = [("api.allowed.test", echo), ("allowed.test", echo), ("a.sub.test", echo), ("sub.test", echo)];
        let h = start(policy(&["allowed.test", "*.sub.test"], &overrides), None).await;
        for (target, code) in [
            ("api.allowed.test:443", "200"),
            ("API.Allowed.Test.:443", "200"),
            ("a.sub.test:443", "200"),
            ("sub.test:443", "403"),
            ("notallowed.test:443", "403"),
        ] {
            let mut stream = TcpStream::connect(("127.0.0.1", h.proxy.port())).await.expect("connect");
            stream.write_all(&connect_request(target, ALICE)).await.expect("send");
            let mut line = vec![0; 12];
            stream.read_exact(&mut line).await.expect("status");
            assert_eq!(String::from_utf8_lossy(&line), format!("HTTP/1.1 {code}"), "{target}");
        }
        assert_eq!(h.decisions()[1].host, "api.allowed.test");
    }

    #[tokio::test]
    async fn a_users_own_list_replaces_the_global_one() {
        let echo = echo_server().await;
        let overrides = [("allowed.test", echo), ("other.test", echo)];
        let h = start(policy(&["allowed.test"], &overrides), Some(vec!["other.test".to_owned()])).await;
        let connect = |credential, target| {
            let request = connect_request(target, credential);
            let h = &h;
            async move {
                let mut stream = TcpStream::connect(("127.0.0.1", h.proxy.port())).await.expect("connect");
                stream.write_all(&request).await.expect("send");
                let mut line = vec![0; 12];
                stream.read_exact(&mut line).await.expect("status");
                String::from_utf8_lossy(&line).into_owned()
            }
        };
        assert_eq!(connect(BOB, "allowed.test:443").await, "HTTP/1.1 403");
        assert_eq!(connect(BOB, "other.test:443").await, "HTTP/1.1 200");
        assert_eq!(connect(ALICE, "allowed.test:443").await, "HTTP/1.1 200");
        assert_eq!(connect(ALICE, "other.test:443").await, "HTTP/1.1 403");
        let who: Vec<_> = h.decisions().iter().map(|d| (d.user_id.clone(), d.allowed)).collect();
        let expected = [("bob", false), ("bob", true), ("alice", true), ("alice", false)];
        assert_eq!(who, expected.map(|(u, a)| (u.to_owned(), a)));
    }

    #[tokio::test]
    async fn malformed_oversized_or_slow_heads_get_400_or_408() {
        let h = start(EgressPolicy { head_timeout: Duration::from_millis(300), ..policy(&["*"], &[]) }, None).await;
        let mut oversized = format!("GET http://allowed.test/ HTTP/1.1\r\n{}X-Big: ", auth(ALICE)).into_bytes();
        oversized.resize(MAX_HEAD_BYTES + 4096, b'a');
        oversized.extend_from_slice(b"\r\n\r\n");
        let response = h.exchange(&oversized).await;
        assert_eq!(status(&response), "HTTP/1.1 400 Bad Request");
        assert!(response.contains("larger than 16 KiB"), "{response}");
        for bad in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET https://allowed.test/ HTTP/1.1\r\n\r\n",
            "CONNECT allowed.test HTTP/1.1\r\n\r\n",
            "CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n",
            "CONNECT allowed.test:443 HTTP/2\r\n\r\n",
            "CONNECT allowed.test:443  HTTP/1.1\r\n\r\n",
            "CONNECT a..b:443 HTTP/1.1\r\n\r\n",
            "CONNECT a/b:443 HTTP/1.1\r\n\r\n",
            "CONNECT ::1:443 HTTP/1.1\r\n\r\n",
            "GET http://allowed.test@evil.test/ HTTP/1.1\r\n\r\n",
            "GET http://allowed.test/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET http://allowed.test/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "GET http://allowed.test/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET http://allowed.test/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "\r\n\r\n",
            "GET http:/\u{e9}x/ HTTP/1.1\r\n\r\n",
            "GET https:/\u{e9}x/ HTTP/1.1\r\n\r\n",
            "GET http://\u{e9}.test/ HTTP/1.1\r\n\r\n",
        ] {
            let response = h.exchange(bad.as_bytes()).await;
            assert_eq!(status(&response), "HTTP/1.1 400 Bad Request", "{bad:?}");
        }
        let response = h.exchange(b"CONNECT allowed.test:443 HTTP/1.1\r\n").await;
        assert_eq!(status(&response), "HTTP/1.1 408 Request Timeout");
        assert!(h.decisions().is_empty(), "no decision without a request");
    }

    #[tokio::test]
    async fn unreachable_upstream_gets_502_and_private_addresses_403() {
        let gone = closed_port().await;
        let h = start(policy(&["unreachable.test", "localhost"], &[("unreachable.test", gone)]), None).await;
        let response = h.exchange(&connect_request("unreachable.test:443", ALICE)).await;
        assert_eq!(status(&response), "HTTP/1.1 502 Bad Gateway");
        let d = &h.decisions()[0];
        assert!(d.allowed && d.reason.as_deref().is_some_and(|r| r.starts_with("upstream unreachable")));
        // localhost resolves (from /etc/hosts) to loopback.
        let response = h.exchange(&connect_request("localhost:443", ALICE)).await;
        assert_eq!(status(&response), "HTTP/1.1 403 Forbidden");
        assert!(response.contains("private or local addresses"), "{response}");
        assert!(!h.decisions()[1].allowed);
    }

    #[test]
    fn public_addresses() {
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[tokio::test]
    async fn proxy_url_and_shutdown() {
        let h = start(policy(&[], &[]), None).await;
        let port = h.proxy.port();
        assert_eq!(h.proxy.proxy_url("cah-abc123"), format!("http://cah:cah-abc123@127.0.0.1:{port}"));
        assert_eq!(h.proxy.proxy_url("a:b@c/d"), format!("http://cah:a%3Ab%40c%2Fd@127.0.0.1:{port}"));
        // An open tunnel ends with the proxy.
        let echo = echo_server().await;
        let h2 = start(policy(&["allowed.test"], &[("allowed.test", echo)]), None).await;
        let mut stream = TcpStream::connect(("127.0.0.1", h2.proxy.port())).await.expect("connect");
        stream.write_all(&connect_request("allowed.test:443", ALICE)).await.expect("send");
        let mut answer = [0; 12];
        stream.read_exact(&mut answer).await.expect("answer");
        h2.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), h2.served).await.expect("serve ended").expect("join").expect("ok");
        let rest = read_to_end(&mut stream).await;
        assert!(rest.ends_with("\r\n\r\n"), "{rest:?}");
        h.shutdown.cancel();
        h.served.await.expect("join").expect("ok");
    }
}
