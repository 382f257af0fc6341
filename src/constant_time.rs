//! Comparing what a caller sent with what herald expects, in the same time
//! wherever the two differ: signatures, seals and tokens.

use subtle::{Choice, ConstantTimeEq};

/// `given` equals one of `expected` (current and previous values during a
/// rotation). Every candidate is compared, whichever matches.
pub fn matches_any<E: AsRef<[u8]>>(given: &[u8], expected: impl IntoIterator<Item = E>) -> bool {
    let any = expected
        .into_iter()
        .fold(Choice::from(0), |any, e| any | given.ct_eq(e.as_ref()));
    bool::from(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_candidate_matches_and_lengths_must_agree() {
        assert!(matches_any(b"new", [b"old".as_slice(), b"new".as_slice()]));
        assert!(!matches_any(b"ne", [b"new"]));
        assert!(!matches_any(b"", std::iter::empty::<&[u8]>()));
    }
}
