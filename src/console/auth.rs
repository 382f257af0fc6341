//! Who may use the console: tokens, sessions, CSRF and the same-origin rule.
//!
//! The login form trades a token for a random session id in an HttpOnly,
//! SameSite=Strict cookie; the session lives server-side for [`SESSION_TTL`]
//! and carries its own CSRF token, which every POST must send back. API
//! clients send `Authorization: Bearer <token>` instead (no cookie, so no
//! CSRF). A POST whose `Origin` (or `Sec-Fetch-Site`) says another site is
//! refused whatever it carries. [`decide`] is the whole rule, without I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{ConsoleConfig, Secret};
use crate::constant_time::matches_any;

/// The session cookie's name.
pub const COOKIE: &str = "herald_console";
/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The configured tokens with the names the audit records for them.
pub struct Tokens(Vec<(String, Secret)>);

impl Tokens {
    pub fn from_config(config: &ConsoleConfig) -> Self {
        Self(
            config
                .named_tokens()
                .into_iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
        )
    }

    /// The name of the token `given` is, comparing with every token in constant time.
    pub fn name_of(&self, given: &str) -> Option<String> {
        let mut found = None;
        for (name, token) in &self.0 {
            if matches_any(given.as_bytes(), [token.expose().as_bytes()]) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found
    }

    /// Every token, for scrubbing text that must never carry one.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(_, t)| t.expose())
    }
}

/// One logged-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// The token's name: who the audit records.
    pub name: String,
    pub csrf: String,
    expires: Instant,
}

/// Sessions by id, in memory: a restart logs everyone out.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    pub fn create(&self, name: &str, now: Instant) -> Session {
        let session = Session {
            id: random_hex(),
            name: name.to_string(),
            csrf: random_hex(),
            expires: now + SESSION_TTL,
        };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires > now);
        map.insert(session.id.clone(), session.clone());
        session
    }

    /// The live session `id` names, if any.
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).filter(|s| s.expires > now).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// 32 random bytes as hex: a session id, a CSRF token, a plan id.
pub fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The `Set-Cookie` value of a new session.
pub fn session_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether a request comes from a page of this console (or from no browser
/// at all): `Origin` must name the `Host` it was sent to (an opaque `null`
/// origin needs `Sec-Fetch-Site: same-origin`), and without an `Origin` the
/// browser's `Sec-Fetch-Site` must not say another site.
pub fn same_origin(origin: Option<&str>, host: Option<&str>, fetch_site: Option<&str>) -> bool {
    match origin {
        // Sent for a page whose referrer policy hides it, and by sandboxed frames: the
        // browser's own Sec-Fetch-Site decides.
        Some("null") => fetch_site == Some("same-origin"),
        Some(origin) => host.is_some_and(|host| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
        }),
        None => !matches!(fetch_site, Some("cross-site" | "same-site")),
    }
}

/// The CSRF token `given` is the session's, compared in constant time.
pub fn csrf_matches(session: &Session, given: Option<&str>) -> bool {
    given.is_some_and(|g| matches_any(g.as_bytes(), [session.csrf.as_bytes()]))
}

/// Who is calling, once let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A browser with a session.
    Session(Session),
    /// An API client with a valid bearer token, by the token's name.
    Bearer(String),
}

impl Caller {
    /// The name the audit records.
    pub fn name(&self) -> &str {
        match self {
            Caller::Session(s) => &s.name,
            Caller::Bearer(name) => name,
        }
    }

    /// The CSRF token forms must carry; bearer clients need none.
    pub fn csrf(&self) -> Option<&str> {
        match self {
            Caller::Session(s) => Some(&s.csrf),
            Caller::Bearer(_) => None,
        }
    }

    /// What server-side state (purge plans) is bound to.
    pub fn owner(&self) -> String {
        match self {
            Caller::Session(s) => format!("session:{}", s.id),
            Caller::Bearer(name) => format!("bearer:{name}"),
        }
    }
}

/// What is known of a request to a protected route.
#[derive(Debug, Default)]
pub struct Facts<'a> {
    /// A POST (an action); anything else only reads.
    pub post: bool,
    /// Under `/api/`: answered with 401, not a redirect.
    pub api: bool,
    /// `Some(name)` for a valid bearer token, `Some(None)` for a wrong one.
    pub bearer: Option<Option<String>>,
    /// The live session the cookie names.
    pub session: Option<Session>,
    pub same_origin: bool,
    /// The form's `csrf` field, for a POST with a session.
    pub csrf: Option<&'a str>,
}

/// What the guard does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Caller),
    /// A page without a login: 303 to `/login`, no data.
    Login,
    /// An API call without a valid token: 401, no data.
    Unauthorized,
    /// Refused whoever it is: 403 with why.
    Forbidden(&'static str),
}

pub fn decide(facts: Facts<'_>) -> Decision {
    if facts.post && !facts.same_origin {
        return Decision::Forbidden("cross-origin request refused");
    }
    match (facts.bearer, facts.session) {
        (Some(Some(name)), _) => Decision::Allow(Caller::Bearer(name)),
        (Some(None), _) => Decision::Unauthorized,
        (None, Some(session)) => {
            if facts.post && !csrf_matches(&session, facts.csrf) {
                Decision::Forbidden(
                    "missing or wrong CSRF token: reload the page and submit the form again",
                )
            } else {
                Decision::Allow(Caller::Session(session))
            }
        }
        (None, None) if facts.api => Decision::Unauthorized,
        (None, None) => Decision::Login,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens(vec![
            ("oncall".into(), Secret::new("0123456789abcdef-oncall")),
            ("alice".into(), Secret::new("0123456789abcdef-alice")),
        ])
    }

    #[test]
    fn each_token_is_known_by_its_own_name_and_nothing_else_passes() {
        let t = tokens();
        assert_eq!(
            t.name_of("0123456789abcdef-alice").as_deref(),
            Some("alice")
        );
        assert_eq!(
            t.name_of("0123456789abcdef-oncall").as_deref(),
            Some("oncall")
        );
        assert_eq!(t.name_of("0123456789abcdef-"), None);
        assert_eq!(t.name_of(""), None);
    }

    #[test]
    fn sessions_expire_and_end_on_logout() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let s = sessions.create("oncall", now);
        assert_eq!(s.id.len(), 64);
        assert_ne!(s.id, s.csrf);
        assert_eq!(
            sessions.get(&s.id, now + Duration::from_secs(60)),
            Some(s.clone())
        );
        assert_eq!(sessions.get(&s.id, now + SESSION_TTL), None);
        sessions.remove(&s.id);
        assert_eq!(sessions.get(&s.id, now), None);
        assert_eq!(sessions.get("made-up", now), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_parsed_by_name() {
        let set = session_cookie("abc");
        for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
            assert!(set.contains(flag), "{set}");
        }
        assert!(cleared_cookie().contains("Max-Age=0"));
        assert_eq!(cookie("a=1; herald_console=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("herald_console_x=1", COOKIE), None);
        assert_eq!(bearer("Bearer tok"), Some("tok"));
        assert_eq!(bearer("bearer  tok "), Some("tok"));
        assert_eq!(bearer("Basic dTpw"), None);
    }

    #[test]
    fn only_this_console_origin_may_post() {
        let host = Some("127.0.0.1:8081");
        assert!(same_origin(Some("http://127.0.0.1:8081"), host, None));
        assert!(!same_origin(Some("http://evil.example"), host, None));
        assert!(!same_origin(Some("null"), host, None));
        assert!(!same_origin(Some("null"), host, Some("cross-site")));
        assert!(same_origin(Some("null"), host, Some("same-origin")));
        assert!(!same_origin(Some("http://127.0.0.1:8081"), None, None));
        assert!(same_origin(None, host, None), "curl sends no Origin");
        assert!(same_origin(None, host, Some("same-origin")));
        assert!(!same_origin(None, host, Some("cross-site")));
    }

    #[test]
    fn the_guard_lets_in_sessions_with_their_csrf_token_and_valid_bearers_only() {
        let s = Sessions::default().create("oncall", Instant::now());
        let csrf = s.csrf.clone();
        let page = |session: Option<Session>| Facts {
            session,
            same_origin: true,
            ..Facts::default()
        };
        assert_eq!(decide(page(None)), Decision::Login);
        assert_eq!(
            decide(Facts {
                api: true,
                ..page(None)
            }),
            Decision::Unauthorized
        );
        assert_eq!(
            decide(page(Some(s.clone()))),
            Decision::Allow(Caller::Session(s.clone()))
        );
        let post = |csrf: Option<&str>, same_origin: bool| {
            decide(Facts {
                post: true,
                csrf,
                same_origin,
                session: Some(s.clone()),
                ..Facts::default()
            })
        };
        assert!(matches!(post(None, true), Decision::Forbidden(w) if w.contains("CSRF")));
        assert!(matches!(post(Some("wrong"), true), Decision::Forbidden(_)));
        assert!(
            matches!(post(Some(&csrf), false), Decision::Forbidden(w) if w.contains("cross-origin"))
        );
        assert_eq!(
            post(Some(&csrf), true),
            Decision::Allow(Caller::Session(s.clone()))
        );
        let api = |bearer| Facts {
            api: true,
            post: true,
            same_origin: true,
            bearer: Some(bearer),
            ..Facts::default()
        };
        assert_eq!(
            decide(api(Some("alice".into()))),
            Decision::Allow(Caller::Bearer("alice".into()))
        );
        assert_eq!(decide(api(None)), Decision::Unauthorized);
    }
}
