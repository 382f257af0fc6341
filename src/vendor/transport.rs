//! The HTTP client every vendor's requests go through.
//!
//! A direct connection uses hyper's pooled client over rustls, with the request
//! built once from parts the vendor client prepared (a parsed `Uri`, its
//! headers, its body). The same exchange through reqwest cost 29% more
//! instructions per job (170,124 against 131,955, callgrind): reqwest re-parses
//! every request's URL into a `Url` (its redirect layer, its pending-request
//! state), boxes the body and walks its middleware (docs/benchmarks.md).
//!
//! When an environment proxy applies to the vendor (`HTTPS_PROXY`,
//! `HTTP_PROXY`, `ALL_PROXY`, less `NO_PROXY`, as curl reads them), the account
//! goes through reqwest, which speaks to proxies (CONNECT tunnels, their
//! authentication) as herald always did.
//!
//! Neither follows redirects: one would carry custom credential headers (OpenIM
//! `token`, NetEase `CheckSum`) and a re-posted body (OpenIM's secret) to
//! whatever host the `Location` names. No vendor API redirects.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::builderstates::WantsSchemes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::outcome::{Answer, Class};

/// An answer longer than this is not read to the end: no vendor's reply comes near it.
pub const MAX_ANSWER: usize = 1 << 20;

const USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("herald/", env!("CARGO_PKG_VERSION")));

const ANY: HeaderValue = HeaderValue::from_static("*/*");

/// TCP keepalive probes on vendor connections, as reqwest sent them: an idle
/// pooled connection a NAT or load balancer dropped is found before it is reused.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// `Content-Type` of a JSON body.
pub const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// How long an idle connection to a vendor is kept for the next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One account's HTTP client.
pub struct Http {
    backend: Backend,
    timeout: Duration,
}

enum Backend {
    Direct(Direct),
    /// An environment proxy applies to the vendor: reqwest speaks to it.
    Proxied(reqwest::Client),
}

/// The status and text of a vendor's answer.
pub type Reply = (StatusCode, String);

impl Http {
    /// A client for requests to `base` (the account's `base_url`), each allowed
    /// `timeout` from the first byte sent to the last byte of the answer read.
    pub fn new(base: &Uri, timeout: Duration) -> anyhow::Result<Http> {
        Self::with_proxies(base, timeout, &Matcher::from_system())
    }

    fn with_proxies(base: &Uri, timeout: Duration, proxies: &Matcher) -> anyhow::Result<Http> {
        let connect_timeout = timeout.min(Duration::from_secs(3));
        let backend = if proxies.intercept(base).is_some() {
            Backend::Proxied(
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(timeout)
                    .connect_timeout(connect_timeout)
                    .build()?,
            )
        } else {
            Backend::Direct(direct(connect_timeout, webpki_roots()?))
        };
        Ok(Http { backend, timeout })
    }

    /// Whether requests go through an environment proxy.
    pub fn is_proxied(&self) -> bool {
        matches!(self.backend, Backend::Proxied(_))
    }

    /// POSTs `body` with `headers` (herald's user agent added) and reads the answer.
    ///
    /// A failure is the transport's answer: a timeout, a refused connection
    /// (`unsent`), a broken exchange or an answer over [`MAX_ANSWER`]. Its
    /// detail never holds the URI: Tencent's carries the UserSig.
    pub async fn post(
        &self,
        uri: Uri,
        mut headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<Reply, Answer> {
        headers.insert(header::USER_AGENT, USER_AGENT);
        headers.insert(header::ACCEPT, ANY);
        let exchange = async {
            match &self.backend {
                Backend::Direct(client) => direct_exchange(client, uri, headers, body).await,
                Backend::Proxied(client) => proxied_exchange(client, uri, headers, body).await,
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(reply) => reply,
            Err(_) => Err(failure(
                "timeout",
                &format!(
                    "request timed out after {}",
                    humantime::format_duration(self.timeout)
                ),
                None,
                false,
            )),
        }
    }
}

/// `value` as the value of header `name`, or the answer saying it cannot be one
/// (a control character in it). The value is not quoted: it may be a credential.
pub fn header_value(name: &str, value: &str) -> Result<HeaderValue, Answer> {
    HeaderValue::from_bytes(value.as_bytes()).map_err(|_| {
        Answer::new(
            Class::Transient,
            Some("transport".into()),
            format!("the {name} header would hold a character HTTP does not allow"),
        )
    })
}

/// `body` as JSON, or the final answer saying it cannot be.
pub fn json_body(body: &impl serde::Serialize) -> Result<Vec<u8>, Answer> {
    serde_json::to_vec(body).map_err(|e| {
        Answer::new(
            Class::Permanent,
            None,
            format!("request body is not JSON: {e}"),
        )
    })
}

type Direct = Client<Bounded<HttpsConnector<HttpConnector>>, Full<Bytes>>;

/// A connector whose whole connect (name lookup, TCP, TLS handshake) has a
/// deadline: a vendor that accepts and then says nothing ends the attempt as
/// unsent after it, as a refused connection does.
#[derive(Clone)]
struct Bounded<C> {
    inner: C,
    timeout: Duration,
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl<C> tower_service::Service<Uri> for Bounded<C>
where
    C: tower_service::Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (connecting, timeout) = (self.inner.call(uri), self.timeout);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "connecting took over {}",
                        humantime::format_duration(timeout)
                    ),
                )) as BoxError),
            }
        })
    }
}

/// The public web's roots (Mozilla's, from `webpki-roots`), as reqwest had them.
fn webpki_roots() -> anyhow::Result<HttpsConnectorBuilder<WantsSchemes>> {
    Ok(HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?)
}

fn direct(connect_timeout: Duration, tls: HttpsConnectorBuilder<WantsSchemes>) -> Direct {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_keepalive(Some(KEEPALIVE));
    tcp.set_keepalive_interval(Some(KEEPALIVE));
    tcp.set_keepalive_retries(Some(3));
    tcp.set_connect_timeout(Some(connect_timeout));
    let connector = Bounded {
        inner: tls.https_or_http().enable_http1().wrap_connector(tcp),
        timeout: connect_timeout,
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

async fn direct_exchange(
    client: &Direct,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Result<Reply, Answer> {
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    let response = client.request(request).await.map_err(|err| {
        let connect = err.is_connect();
        let code = match (connect, timed_out(&err)) {
            (true, true) => "timeout",
            (true, false) => "connect",
            (false, _) => "transport",
        };
        failure(code, what(code), Some(&err), connect)
    })?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(
            |err| match err.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => oversize(),
                None => failure("transport", what("transport"), Some(err.as_ref()), false),
            },
        )?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

async fn proxied_exchange(
    client: &reqwest::Client,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Result<Reply, Answer> {
    let mut response = client
        .post(uri.to_string())
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(reqwest_failure)?;
    let status = response.status();
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(reqwest_failure)? {
        if bytes.len() + chunk.len() > MAX_ANSWER {
            return Err(oversize());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Classifies a failed reqwest exchange. The URL is dropped first: reqwest
/// prints it whole, and Tencent's carries the UserSig.
fn reqwest_failure(err: reqwest::Error) -> Answer {
    let err = err.without_url();
    let code = if err.is_timeout() {
        "timeout"
    } else if err.is_connect() {
        "connect"
    } else {
        "transport"
    };
    failure(code, what(code), Some(&err), err.is_connect())
}

fn what(code: &str) -> &'static str {
    match code {
        "timeout" => "request timed out",
        "connect" => "could not connect",
        _ => "transport error",
    }
}

/// Whether a timeout is among the causes of `err` (a connect timeout).
fn timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A transport failure: nothing here is the vendor's verdict on the job.
fn failure(code: &str, what: &str, err: Option<&(dyn StdError + 'static)>, unsent: bool) -> Answer {
    let detail = match err {
        Some(err) => format!("{what}: {}", error_chain(err)),
        None => what.to_string(),
    };
    let mut answer = Answer::new(Class::Transient, Some(code.into()), detail);
    answer.unsent = unsent;
    answer
}

fn oversize() -> Answer {
    Answer::new(
        Class::Transient,
        Some("garbage".into()),
        format!("vendor answered more than {} KiB", MAX_ANSWER / 1024),
    )
}

fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Both backends, whatever the environment says: the direct one and reqwest's.
    fn clients(base: &str, timeout: Duration) -> Vec<Http> {
        let base: Uri = base.parse().unwrap();
        let none = Matcher::builder().build();
        let all = Matcher::builder().all("http://127.0.0.1:9").build();
        let clients = vec![
            Http::with_proxies(&base, timeout, &none).unwrap(),
            Http::with_proxies(&base, timeout, &all).unwrap(),
        ];
        assert!(!clients[0].is_proxied() && clients[1].is_proxied());
        clients
    }

    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    #[test]
    fn an_environment_proxy_is_used_only_where_it_applies() {
        let proxies = Matcher::builder()
            .https("http://proxy.internal:3128")
            .no("openim.internal,10.0.0.0/8")
            .build();
        let proxied = |base: &str| {
            Http::with_proxies(&base.parse().unwrap(), Duration::from_secs(1), &proxies)
                .unwrap()
                .is_proxied()
        };
        assert!(proxied("https://api.netease.im/nimserver"));
        assert!(proxied("https://console.tim.qq.com"));
        assert!(!proxied("http://api.netease.im/nimserver"), "no HTTP_PROXY");
        assert!(
            !proxied("https://openim.internal:10002"),
            "NO_PROXY names it"
        );
        assert!(
            !proxied("https://10.1.2.3:10002"),
            "NO_PROXY's network holds it"
        );
    }

    #[tokio::test]
    async fn a_transport_error_does_not_carry_the_request_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let base = format!("http://127.0.0.1:{port}");
        let uri: Uri = format!("{base}/v4/openim/sendmsg?usersig=S3CRET-usersig")
            .parse()
            .unwrap();
        for http in clients(&base, Duration::from_secs(1)) {
            let answer = http
                .post(uri.clone(), HeaderMap::new(), Vec::new())
                .await
                .unwrap_err();
            assert_eq!(answer.code.as_deref(), Some("connect"), "{}", answer.detail);
            assert!(answer.unsent, "a refused connection sent nothing");
            assert!(!answer.detail.contains("S3CRET"), "{}", answer.detail);
        }
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_with_the_credentials() {
        let elsewhere_hits = Arc::new(AtomicUsize::new(0));
        let hits = Arc::clone(&elsewhere_hits);
        let elsewhere = serve(axum::Router::new().fallback(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            async { "got it" }
        }))
        .await;
        let location = format!("{elsewhere}/auth/get_admin_token");
        let vendor = serve(axum::Router::new().fallback(move || {
            let location = location.clone();
            async move {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, location)],
                )
            }
        }))
        .await;
        for http in clients(&vendor, Duration::from_secs(2)) {
            let mut headers = HeaderMap::new();
            headers.insert("token", HeaderValue::from_static("S3CRET-token"));
            let (status, _) = http
                .post(
                    format!("{vendor}/auth/get_admin_token").parse().unwrap(),
                    headers,
                    br#"{"secret":"S3CRET"}"#.to_vec(),
                )
                .await
                .unwrap();
            assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        }
        assert_eq!(elsewhere_hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_request_arrives_whole_with_herald_s_user_agent() {
        let vendor = serve(axum::Router::new().fallback(
            |headers: HeaderMap, body: Bytes| async move {
                let get = |name: &str| {
                    headers
                        .get(name)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default()
                };
                format!(
                    "{}|{}|{}|{}",
                    get("user-agent"),
                    get("operationid"),
                    get("content-length"),
                    String::from_utf8_lossy(&body)
                )
            },
        ))
        .await;
        for http in clients(&vendor, Duration::from_secs(2)) {
            let mut headers = HeaderMap::new();
            // A job id is any printable UTF-8: it goes out as its bytes.
            headers.insert(
                "operationid",
                header_value("operationID", "訂單-8812-1").unwrap(),
            );
            let (status, text) = http
                .post(
                    format!("{vendor}/msg").parse().unwrap(),
                    headers,
                    "{\"to\":\"ü\"}".as_bytes().to_vec(),
                )
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
            let expected = format!(
                "herald/{}|訂單-8812-1|{}|{{\"to\":\"ü\"}}",
                env!("CARGO_PKG_VERSION"),
                "{\"to\":\"ü\"}".len()
            );
            assert_eq!(text, expected);
        }
    }

    #[tokio::test]
    async fn a_vendor_that_hangs_or_floods_gets_a_transport_answer() {
        let vendor = serve(
            axum::Router::new()
                .route(
                    "/hang",
                    axum::routing::post(|| async {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        "late"
                    }),
                )
                .route(
                    "/flood",
                    axum::routing::post(|| async { "x".repeat(MAX_ANSWER + 1) }),
                ),
        )
        .await;
        for http in clients(&vendor, Duration::from_millis(300)) {
            let hung = http
                .post(
                    format!("{vendor}/hang").parse().unwrap(),
                    HeaderMap::new(),
                    Vec::new(),
                )
                .await
                .unwrap_err();
            assert_eq!(hung.code.as_deref(), Some("timeout"), "{}", hung.detail);
            assert_eq!(hung.class, Class::Transient);
            assert!(!hung.unsent, "the request may have reached the vendor");
        }
        for http in clients(&vendor, Duration::from_secs(5)) {
            let flooded = http
                .post(
                    format!("{vendor}/flood").parse().unwrap(),
                    HeaderMap::new(),
                    Vec::new(),
                )
                .await
                .unwrap_err();
            assert_eq!(
                flooded.code.as_deref(),
                Some("garbage"),
                "{}",
                flooded.detail
            );
            assert_eq!(flooded.class, Class::Transient);
        }
    }

    /// A test CA, and a certificate it issued for `localhost` with its key (tests/vectors/tls).
    const CA: &[u8] = include_bytes!("../../tests/vectors/tls/ca.pem");
    const LOCALHOST: &[u8] = include_bytes!("../../tests/vectors/tls/localhost.pem");
    const LOCALHOST_KEY: &[u8] = include_bytes!("../../tests/vectors/tls/localhost.key");

    /// A TLS server answering every request `200 ok`, on `localhost`.
    async fn tls_vendor(cert: &[u8], key: &[u8]) -> String {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certs = CertificateDer::pem_slice_iter(cert)
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer =
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        format!("https://localhost:{port}")
    }

    #[tokio::test]
    async fn a_vendor_over_tls_is_verified_against_the_roots() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let vendor = tls_vendor(LOCALHOST, LOCALHOST_KEY).await;
        let uri: Uri = format!("{vendor}/v4/openim/sendmsg").parse().unwrap();
        let timeout = Duration::from_secs(5);

        // The roots herald ships with do not know the test CA: the handshake fails, nothing is sent.
        let public = Http::with_proxies(&uri, timeout, &Matcher::builder().build()).unwrap();
        assert!(!public.is_proxied());
        let refused = public
            .post(uri.clone(), HeaderMap::new(), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(
            refused.code.as_deref(),
            Some("connect"),
            "{}",
            refused.detail
        );
        assert!(refused.detail.contains("certificate"), "{}", refused.detail);
        assert!(refused.unsent);

        // Trusting the CA, the same client configuration completes the exchange.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CA).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tls = HttpsConnectorBuilder::new().with_tls_config(config);
        let trusting = Http {
            backend: Backend::Direct(direct(timeout, tls)),
            timeout,
        };
        let (status, text) = trusting
            .post(uri, HeaderMap::new(), Vec::new())
            .await
            .unwrap();
        assert_eq!((status, text.as_str()), (StatusCode::OK, "ok"));
    }

    #[tokio::test]
    async fn a_vendor_that_accepts_and_never_shakes_hands_is_unsent_after_the_connect_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and holds every connection, saying nothing: a TLS handshake never ends.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let http = Http {
            backend: Backend::Direct(direct(Duration::from_millis(200), webpki_roots().unwrap())),
            timeout: Duration::from_secs(10),
        };
        let started = std::time::Instant::now();
        let answer = http
            .post(
                format!("https://localhost:{port}/v4/openim/sendmsg")
                    .parse()
                    .unwrap(),
                HeaderMap::new(),
                Vec::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(answer.code.as_deref(), Some("timeout"), "{}", answer.detail);
        assert!(answer.unsent, "nothing was sent: {}", answer.detail);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_header_value_with_a_control_character_is_refused_without_quoting_it() {
        let answer = header_value("token", "S3CRET\r\nX-Injected: 1").unwrap_err();
        assert!(!answer.detail.contains("S3CRET"), "{}", answer.detail);
        assert!(answer.detail.contains("token"), "{}", answer.detail);
    }
}
