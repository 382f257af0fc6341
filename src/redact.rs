//! Keeping secrets out of text: URLs printed without their password, and error
//! texts from libraries and vendors scrubbed of the credentials herald sent.
//!
//! Library errors are not ours to word: reqwest and lapin put URLs in them, a
//! proxy's error page may echo a request. So every text built from a failure
//! passes through here before it reaches a log line, a header or a message.

/// What replaces a secret in text.
pub const MASK: &str = "****";

/// `raw` as a URL fit to print: its password masked, whatever shape it has.
///
/// Only a URL that parses into scheme, credentials and host is shown; in
/// anything else (`amqp:user:pass@host`, an `@` left in the path, a bad port)
/// the password's place is unknown, so everything after the scheme is hidden.
pub fn url(raw: &str) -> String {
    let Some(scheme) = scheme(raw) else {
        return "<unparseable URL>".into();
    };
    let hidden = format!("{scheme}://<unparseable URL>");
    let Ok(mut url) = url::Url::parse(raw) else {
        return hidden;
    };
    if url.cannot_be_a_base() || !url.has_host() {
        return hidden;
    }
    let has_userinfo = !url.username().is_empty() || url.password().is_some();
    if url.password().is_some() && url.set_password(Some(MASK)).is_err() {
        return hidden;
    }
    let shown = url.to_string();
    // `@` inside user info is percent-encoded, so only its delimiter may remain;
    // another means part of the input was read as path or query, password and all.
    if shown.matches('@').count() > usize::from(has_userinfo) {
        return hidden;
    }
    shown
}

/// The URL's password as written and percent-decoded, for [`scrub`]; empty if none is found.
///
/// Read both as a URL parser does and as a person would (user info runs to
/// the last `@`, the password from its first `:`): either may be the one a
/// library prints.
pub fn url_passwords(raw: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(password) = url::Url::parse(raw)
        .ok()
        .and_then(|u| u.password().map(String::from))
    {
        found.push(password);
    }
    let rest = scheme(raw).map_or("", |s| &raw[s.len() + 1..]);
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    if let Some((_, password)) = rest
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
    {
        found.push(password.to_string());
    }
    let decoded: Vec<String> = found
        .iter()
        .map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    found.extend(decoded);
    found.retain(|p| !p.is_empty());
    found.sort();
    found.dedup();
    found
}

/// `text` with every occurrence of each secret masked; empty secrets are ignored.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut secrets: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    // Longest first, so a secret that contains another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_string();
    for secret in secrets {
        if out.contains(secret) {
            out = out.replace(secret, MASK);
        }
    }
    out
}

/// The scheme of `raw` (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`), if it has one.
fn scheme(raw: &str) -> Option<&str> {
    let (scheme, _) = raw.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_url_keeps_everything_but_its_password() {
        assert_eq!(
            url("amqp://guest:hunter2@127.0.0.1:5672/%2f"),
            "amqp://guest:****@127.0.0.1:5672/%2f"
        );
        assert_eq!(url("amqp://10.0.0.1/%2f"), "amqp://10.0.0.1/%2f");
        assert_eq!(url("amqps://u@host/vh"), "amqps://u@host/vh");
    }

    #[test]
    fn percent_encoded_and_odd_passwords_are_masked_whole() {
        for raw in [
            "amqp://u:p%40ss%2Fw0rd@host:5672/%2f",
            "amqp://u:pa ss@host/",
            "amqp://u:p:a:ss@host/",
            "amqp://u@x:pass@host/",
        ] {
            let shown = url(raw);
            assert!(!shown.contains("ss"), "{raw} -> {shown}");
        }
        assert_eq!(url("amqp://u:p%40ss@host/"), "amqp://u:****@host/");
    }

    #[test]
    fn a_url_whose_password_cannot_be_located_is_hidden_after_the_scheme() {
        for raw in [
            "amqp:user:pass@host",
            "amqp:user:pass@host:5672/%2f",
            "amqp://user:1234/pass@host/",
            "amqp://user:pass@",
            "amqp://user:pass@host:99999/",
            "amqp://user:pa#ss@host/",
            "amqp://user:pa?ss@host/",
            "amqp://user:pass@[::1/",
        ] {
            let shown = url(raw);
            assert_eq!(shown, "amqp://<unparseable URL>", "{raw}");
        }
        assert_eq!(url("user:pass@host"), "user://<unparseable URL>");
        assert_eq!(url("not a url at all"), "<unparseable URL>");
        assert_eq!(url(""), "<unparseable URL>");
    }

    #[test]
    fn the_password_is_found_in_every_form_for_scrubbing() {
        assert_eq!(url_passwords("amqp://u:hunter2@h/"), ["hunter2"]);
        assert_eq!(url_passwords("amqp:u:hunter2@h"), ["hunter2"]);
        assert_eq!(url_passwords("amqp://u:12/pw@h/"), ["12/pw"]);
        assert_eq!(url_passwords("amqp://u:p%40ss@h/"), ["p%40ss", "p@ss"]);
        // An `@` in the query misleads the reading by eye, not the parser.
        assert!(url_passwords("amqp://u:pw@h/?x=a@b").contains(&"pw".to_string()));
        assert!(url_passwords("amqp://h:5672/").is_empty());
        assert!(url_passwords("amqp://u:@h/").is_empty());
    }

    #[test]
    fn scrub_masks_every_occurrence_longest_first() {
        assert_eq!(
            scrub("a=abcdef b=abc c=abcdef", &["abc", "abcdef", ""]),
            "a=**** b=**** c=****"
        );
        assert_eq!(scrub("nothing here", &["secret"]), "nothing here");
    }
}
