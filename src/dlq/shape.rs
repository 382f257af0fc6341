//! An error's shape: its text with what varies from job to job (ids, numbers,
//! times, hex, quoted values) replaced by placeholders, so that
//! `pushcontent is 612 characters` and `pushcontent is 700 characters` fall into one group.

/// Longest shape kept, in characters; the rest of a long vendor body says little more.
const MAX_SHAPE_CHARS: usize = 160;
/// A quoted value longer than this is not taken for one value (an unclosed quote, a body).
const MAX_QUOTED_CHARS: usize = 200;

/// The shape of `error`. Pure and total: any text, however hostile, gives a bounded shape.
pub fn error_shape(error: &str) -> String {
    let chars: Vec<char> = error.chars().take(4 * MAX_SHAPE_CHARS).collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() && out.chars().count() < MAX_SHAPE_CHARS {
        let c = chars[i];
        if let Some(end) = quoted_end(&chars, i) {
            // A quoted word followed by `:` is a key (JSON, `field: value`): it stays.
            if chars.get(end + 1) == Some(&':') {
                out.extend(&chars[i..=end]);
            } else {
                out.push(c);
                out.push('…');
                out.push(c);
            }
            i = end + 1;
        } else if let Some(end) = time_end(&chars, i) {
            out.push_str("<time>");
            i = end;
        } else if c.is_alphanumeric() || c == '_' {
            let end = word_end(&chars, i);
            out.push_str(&word_shape(&chars[i..end]));
            i = end;
        } else if c.is_whitespace() {
            // Runs of whitespace (and newlines) read as one space.
            if !out.ends_with(' ') {
                out.push(' ');
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out.trim().chars().take(MAX_SHAPE_CHARS).collect()
}

/// Where the quoted value opening at `i` closes, if it does within bounds on one line.
fn quoted_end(chars: &[char], i: usize) -> Option<usize> {
    let open = chars[i];
    if !matches!(open, '"' | '\'' | '`') {
        return None;
    }
    // An apostrophe inside a word (`can't`) opens nothing.
    if open == '\'' && i > 0 && chars[i - 1].is_alphanumeric() {
        return None;
    }
    chars
        .iter()
        .enumerate()
        .skip(i + 1)
        .take(MAX_QUOTED_CHARS)
        .take_while(|(_, c)| **c != '\n')
        .find(|(_, c)| **c == open)
        .map(|(j, _)| j)
}

/// The end of an RFC 3339-like time starting at `i` (`2026-11-23T00:00:00.5Z`, `2026-11-23 10:00`).
fn time_end(chars: &[char], i: usize) -> Option<usize> {
    let digits = |from: usize, n: usize| {
        (from..from + n).all(|k| chars.get(k).is_some_and(char::is_ascii_digit))
    };
    let at = |k: usize, c: char| chars.get(k) == Some(&c);
    if i > 0 && chars[i - 1].is_alphanumeric() {
        return None;
    }
    let date =
        digits(i, 4) && at(i + 4, '-') && digits(i + 5, 2) && at(i + 7, '-') && digits(i + 8, 2);
    if !date {
        return None;
    }
    let mut end = i + 10;
    if (at(end, 'T') || at(end, ' '))
        && digits(end + 1, 2)
        && at(end + 3, ':')
        && digits(end + 4, 2)
    {
        end += 6;
        if at(end, ':') && digits(end + 1, 2) {
            end += 3;
        }
        if at(end, '.') || at(end, ',') {
            end += 1;
            while chars.get(end).is_some_and(char::is_ascii_digit) {
                end += 1;
            }
        }
        if at(end, 'Z') {
            end += 1;
        } else if (at(end, '+') || at(end, '-')) && digits(end + 1, 2) {
            end += 3;
            if at(end, ':') {
                end += 1;
            }
            if digits(end, 2) {
                end += 2;
            }
        }
    }
    Some(end)
}

/// A word runs over letters, digits and `_`, and over `-` between hex digits (a UUID).
fn word_end(chars: &[char], i: usize) -> usize {
    let mut end = i;
    while end < chars.len() {
        let c = chars[end];
        let joins_hex = c == '-'
            && chars[i..end]
                .iter()
                .all(|c| c.is_ascii_hexdigit() || *c == '-')
            && chars.get(end + 1).is_some_and(char::is_ascii_hexdigit)
            && chars[i..end].iter().any(char::is_ascii_digit);
        if c.is_alphanumeric() || c == '_' || joins_hex {
            end += 1;
        } else {
            break;
        }
    }
    end
}

/// A word without digits stays; all digits is a number; hex with a digit is
/// hex; any other word with a digit is an id.
fn word_shape(word: &[char]) -> String {
    if !word.iter().any(char::is_ascii_digit) {
        return word.iter().collect();
    }
    if word.iter().all(char::is_ascii_digit) {
        "<n>".into()
    } else if word.iter().all(|c| c.is_ascii_hexdigit() || *c == '-') {
        "<hex>".into()
    } else {
        "<id>".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_that_vary_share_one_shape() {
        let a = error_shape("NetEase 414: pushcontent is 612 characters, at most 500");
        let b = error_shape("NetEase 414: pushcontent is 700 characters, at most 500");
        assert_eq!(a, b);
        assert_eq!(a, "NetEase <n>: pushcontent is <n> characters, at most <n>");
    }

    #[test]
    fn ids_hex_uuids_times_and_quoted_values_are_normalised() {
        assert_eq!(
            error_shape("user u8812x not found (request 550e8400-e29b-41d4-a716-446655440000)"),
            "user <id> not found (request <hex>)"
        );
        assert_eq!(
            error_shape(
                "trace deadbeef0011 at 2026-11-23T10:00:00.123Z, retry after 2026-11-23 10:05"
            ),
            "trace <hex> at <time>, retry after <time>"
        );
        assert_eq!(
            error_shape("unknown account `acme-7` for vendor 'netease'"),
            "unknown account `…` for vendor '…'"
        );
        assert_eq!(
            error_shape(r#"{"code":414,"desc":"parameter error: to is 'u1'"}"#),
            r#"{"code":<n>,"desc":"…"}"#
        );
        assert_eq!(error_shape("can't   reach\n\nhost"), "can't reach host");
    }

    #[test]
    fn any_text_gives_a_bounded_shape_without_panicking() {
        let long = "x".repeat(10_000);
        assert!(error_shape(&long).chars().count() <= MAX_SHAPE_CHARS);
        for hostile in [
            "\"",
            "'",
            "`unclosed",
            "2026-",
            "2026-11-23T",
            "-",
            "é9",
            "\u{0}",
        ] {
            let _ = error_shape(hostile);
        }
        assert_eq!(error_shape(""), "");
    }
}
