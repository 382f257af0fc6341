//! Values `config check`, logs and errors must never show whole: [`Secret`]
//! and the broker URLs, whose passwords are masked wherever they are printed.

use std::fmt;

use anyhow::bail;
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

/// A value that must never reach a log line, an error or `config check`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

/// A secret written as a number or a boolean is taken as its text: serde's
/// "invalid type" error would quote the value. Anything else fails without it.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(i64),
            Bool(bool),
        }
        Ok(Secret(
            match Raw::deserialize(d).map_err(|_| {
                serde::de::Error::custom("a secret must be a string (its value is not shown)")
            })? {
                Raw::Text(s) => s,
                Raw::Int(i) => i.to_string(),
                Raw::Bool(b) => b.to_string(),
            },
        ))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that signs or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// The broker URL, printed with its password redacted.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password masked, in every form the input may take.
    fn redacted(&self) -> String {
        crate::redact::url(&self.0)
    }

    fn validate(&self, key: &str) -> anyhow::Result<()> {
        if self.0.is_empty() {
            bail!(
                "{key} is empty: every node needs a URL like amqp://user:password@host:5672/vhost"
            );
        }
        match Url::parse(&self.0) {
            // `amqp:user:pass@host` parses, but as a path: the broker would see no host.
            Ok(u) if u.cannot_be_a_base() || !u.has_host() => {
                bail!("{key} has no host: it must look like amqp://user:password@host:5672/vhost")
            }
            Ok(u) if matches!(u.scheme(), "amqp" | "amqps") => Ok(()),
            Ok(u) => bail!("{key} must use amqp:// or amqps://, not {}://", u.scheme()),
            Err(e) => bail!(
                "{key} is not a valid URL: {e} (in HERALD_BROKER_URL, commas separate nodes: write a comma in a password as %2C)"
            ),
        }
    }

    /// The vhost the URL names, as lapin reads it: `/` without a path, empty for a bare `/`.
    fn vhost(&self) -> String {
        let Ok(url) = Url::parse(&self.0) else {
            return String::new();
        };
        let path = url.path().get(1..).unwrap_or("/");
        percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned()
    }

    /// `text` (a library's error, say) with this URL and its password masked.
    pub fn scrub(&self, text: &str) -> String {
        let redacted = self.redacted();
        let masked = if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(self.0.as_str(), &redacted)
        };
        let passwords = crate::redact::url_passwords(&self.0);
        let passwords: Vec<&str> = passwords.iter().map(String::as_str).collect();
        crate::redact::scrub(&masked, &passwords)
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for BrokerUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// `broker.url`: one node's URL, or a cluster's nodes in the order herald
/// tries them; printed with every password redacted. In the file a string or
/// an array of strings; in `HERALD_BROKER_URL` a comma-separated list.
#[derive(Clone)]
pub struct BrokerUrls(Vec<BrokerUrl>);

impl BrokerUrls {
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self(urls.into_iter().map(BrokerUrl::new).collect())
    }

    /// `HERALD_BROKER_URL`'s form: URLs separated by commas, spaces around them
    /// ignored. A comma in a password must be written `%2C`.
    pub fn from_list(text: &str) -> Self {
        Self::new(list_items(text))
    }

    /// The nodes, in the order a connection tries them.
    pub fn nodes(&self) -> &[BrokerUrl] {
        &self.0
    }

    /// The list as a TOML value, for a config file built from `HERALD_BROKER_URL`
    /// or a command-line argument: one URL as a string, more as an array.
    pub fn to_toml(&self) -> String {
        let raw = |u: &BrokerUrl| toml::Value::String(u.0.clone());
        match self.0.as_slice() {
            [one] => raw(one).to_string(),
            many => toml::Value::Array(many.iter().map(raw).collect()).to_string(),
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        let Some(first) = self.0.first() else {
            bail!(
                "broker.url lists no node: give one AMQP URL, or every node of a cluster, e.g. [\"amqp://user:password@rabbit-1:5672/%2f\", \"amqp://user:password@rabbit-2:5672/%2f\"]"
            );
        };
        let first_vhost = first.vhost();
        for (i, node) in self.0.iter().enumerate() {
            // One URL keeps the key's plain name; in a list, the index and the redacted node say which.
            let key = match self.0.len() {
                1 => "broker.url".to_string(),
                _ if node.0.is_empty() => format!("broker.url[{i}]"),
                _ => format!("broker.url[{i}] ({node})"),
            };
            node.validate(&key)?;
            if self.0[..i].iter().any(|other| other.0 == node.0) {
                bail!("{key} is listed twice; list each node once");
            }
            let vhost = node.vhost();
            if vhost != first_vhost {
                bail!(
                    "{key} names vhost `{vhost}` but broker.url[0] names `{first_vhost}`: every node of one cluster serves the same vhosts, so give every URL the same one"
                );
            }
        }
        Ok(())
    }
}

pub(super) fn list_items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim)
}

/// One URL is read as a string, more as an array; anything else fails
/// without quoting the value (it may hold a password).
impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d) {
            Ok(Raw::One(url)) => Ok(Self::new([url])),
            Ok(Raw::Many(urls)) => Ok(Self::new(urls)),
            Err(_) => Err(serde::de::Error::custom(
                "must be an AMQP URL or an array of them (strings; the value is not shown)",
            )),
        }
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, node) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{node}")?;
        }
        Ok(())
    }
}

/// One URL stays a string, so `config check` prints a single-node config as written.
impl Serialize for BrokerUrls {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}
