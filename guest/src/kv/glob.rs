//! Redis glob matching (`stringmatchlen`) for KEYS, SCAN MATCH, CONFIG GET.
//!
//! Same syntax and corner cases as Redis: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`
//! (reversed ranges allowed), `\` escapes, an unterminated `[` treated as
//! ending the class. Redis recurses on `*`; a client-supplied pattern of many
//! stars could then exhaust the guest's stack, so this uses the classic
//! single-backtrack-point loop, which is equivalent because every other
//! pattern element consumes exactly one byte.

/// Byte at `i`, or 0 past the end (Redis reads the sds NUL terminator).
#[inline]
fn at(p: &[u8], i: usize) -> u8 {
    p.get(i).copied().unwrap_or(0)
}

fn fold(c: u8, nocase: bool) -> u8 {
    if nocase {
        c.to_ascii_lowercase()
    } else {
        c
    }
}

/// Matches one non-`*` element starting at `p[i]` against byte `c`.
/// Returns (matched, index of the next element).
fn match_one(p: &[u8], mut i: usize, c: u8, nocase: bool) -> (bool, usize) {
    match p[i] {
        b'?' => (true, i + 1),
        b'[' => {
            i += 1;
            let not = at(p, i) == b'^';
            if not {
                i += 1;
            }
            let mut matched = false;
            loop {
                let left = p.len().saturating_sub(i);
                if at(p, i) == b'\\' && left >= 2 {
                    i += 1;
                    if fold(p[i], nocase) == fold(c, nocase) {
                        matched = true;
                    }
                } else if at(p, i) == b']' {
                    break;
                } else if left == 0 {
                    // Unterminated class: Redis steps back so the outer
                    // advance lands on the end of the pattern.
                    i -= 1;
                    break;
                } else if left >= 3 && p[i + 1] == b'-' {
                    let (mut start, mut end) = (p[i], p[i + 2]);
                    if start > end {
                        core::mem::swap(&mut start, &mut end);
                    }
                    let ch = if nocase {
                        start = start.to_ascii_lowercase();
                        end = end.to_ascii_lowercase();
                        c.to_ascii_lowercase()
                    } else {
                        c
                    };
                    i += 2;
                    if ch >= start && ch <= end {
                        matched = true;
                    }
                } else if fold(p[i], nocase) == fold(c, nocase) {
                    matched = true;
                }
                i += 1;
            }
            (matched != not, i + 1)
        }
        b'\\' if p.len() - i >= 2 => (fold(p[i + 1], nocase) == fold(c, nocase), i + 2),
        lit => (fold(lit, nocase) == fold(c, nocase), i + 1),
    }
}

/// Does `s` match the glob `pattern`?
pub fn matches(pattern: &[u8], s: &[u8], nocase: bool) -> bool {
    // Redis's loop never runs on an empty string, so "" matches only "".
    if s.is_empty() {
        return pattern.is_empty();
    }
    let (mut pi, mut si) = (0usize, 0usize);
    // Where to resume after a mismatch: pattern after the last `*`, and the
    // string position that `*` will next extend to.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < pattern.len() && pattern[pi] == b'*' {
            while pi < pattern.len() && pattern[pi] == b'*' {
                pi += 1;
            }
            if pi == pattern.len() {
                return true;
            }
            star = Some((pi, si));
            continue;
        }
        if pi < pattern.len() {
            let (ok, next) = match_one(pattern, pi, s[si], nocase);
            if ok {
                pi = next;
                si += 1;
                continue;
            }
        }
        match star {
            Some((sp, ss)) if ss + 1 < s.len() => {
                // `*` in Redis only hands non-empty suffixes to the rest of
                // the pattern, hence `ss + 1 < len`.
                star = Some((sp, ss + 1));
                pi = sp;
                si = ss + 1;
            }
            _ => return false,
        }
    }
    while pi < pattern.len() && pattern[pi] == b'*' {
        pi += 1;
    }
    pi >= pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A direct port of Redis 7.0's recursive `stringmatchlen_impl`, used as
    /// the oracle for the iterative version.
    fn redis_impl(p: &[u8], s: &[u8], nocase: bool, skip: &mut bool) -> bool {
        let (mut pi, mut si) = (0usize, 0usize);
        while pi < p.len() && si < s.len() {
            match p[pi] {
                b'*' => {
                    while pi + 1 < p.len() && p[pi + 1] == b'*' {
                        pi += 1;
                    }
                    if p.len() - pi == 1 {
                        return true;
                    }
                    while si < s.len() {
                        if redis_impl(&p[pi + 1..], &s[si..], nocase, skip) {
                            return true;
                        }
                        if *skip {
                            return false;
                        }
                        si += 1;
                    }
                    *skip = true;
                    return false;
                }
                _ => {
                    let (ok, next) = match_one(p, pi, s[si], nocase);
                    if !ok {
                        return false;
                    }
                    si += 1;
                    pi = next;
                }
            }
            if si == s.len() {
                while pi < p.len() && p[pi] == b'*' {
                    pi += 1;
                }
                break;
            }
        }
        pi >= p.len() && si == s.len()
    }

    fn redis(p: &[u8], s: &[u8]) -> bool {
        redis_impl(p, s, false, &mut false)
    }

    #[test]
    fn examples() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"*", b"abc", true),
            (b"*", b"", false),
            (b"", b"", true),
            (b"a*", b"a", true),
            (b"a*", b"abc", true),
            (b"*c", b"abc", true),
            (b"*b*", b"abc", true),
            (b"a?c", b"abc", true),
            (b"a?c", b"ac", false),
            (b"h[ae]llo", b"hello", true),
            (b"h[ae]llo", b"hillo", false),
            (b"h[^e]llo", b"hallo", true),
            (b"h[^e]llo", b"hello", false),
            (b"h[a-b]llo", b"hbllo", true),
            (b"h[b-a]llo", b"hallo", true),
            (b"h[a-b]llo", b"hcllo", false),
            (b"h\\*llo", b"h*llo", true),
            (b"h\\*llo", b"hello", false),
            (b"[\\]]", b"]", true),
            (b"[abc", b"c", true),
            (b"[abc", b"d", false),
            (b"a\\", b"a\\", true),
            (b"key:*", b"key:12", true),
            (b"*a*a*a*b", b"aaaaaaaaaaaaaaaa", false),
        ];
        for (p, s, want) in cases {
            assert_eq!(matches(p, s, false), *want, "{:?} {:?}", p, s);
            assert_eq!(redis(p, s), *want, "oracle {:?} {:?}", p, s);
        }
        assert!(matches(b"SAVE", b"save", true));
        assert!(matches(b"[A-C]x", b"bX", true));
    }

    #[test]
    fn many_stars_do_not_recurse() {
        let p = alloc::vec![b'*'; 1_000_000];
        assert!(matches(&p, b"x", false));
        let mut p2 = alloc::vec::Vec::new();
        for _ in 0..100_000 {
            p2.extend_from_slice(b"*a");
        }
        assert!(!matches(&p2, b"aaaa", false));
    }

    proptest! {
        #[test]
        fn same_as_redis(
            p in proptest::collection::vec(prop::sample::select(&b"ab*?[]^-\\"[..]), 0..10),
            s in proptest::collection::vec(prop::sample::select(&b"ab-]^*"[..]), 0..8),
        ) {
            prop_assert_eq!(matches(&p, &s, false), redis(&p, &s));
        }
    }
}
