//! `${VAR}` and `${VAR:-default}` in recipe paths, so a recipe can point at a fixture cache or a
//! model store without hard-coding a machine's layout. Defaults may themselves use `${...}`.

/// Deepest `${…:-${…}}` nesting expanded; deeper text is refused (it would recurse without bound).
pub(crate) const MAX_NESTING: usize = 16;

/// Expands variables using `lookup`. Errors name the unset variable or the malformed text.
pub(crate) fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let shown = |s: &str| {
        let mut t: String = s.chars().take(60).collect();
        if t.len() < s.len() {
            t.push('…');
        }
        format!("{t:?}")
    };
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let body_start = i + 2;
        // Find the matching close brace, allowing nested ${...} in defaults.
        let mut depth = 1;
        let mut end = None;
        let bytes = rest.as_bytes();
        let mut j = body_start;
        while j < bytes.len() {
            if bytes[j] == b'$' && bytes.get(j + 1) == Some(&b'{') {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(format!("`${{…}}` nested more than {MAX_NESTING} deep in {}", shown(s)));
                }
                j += 2;
                continue;
            }
            if bytes[j] == b'}' {
                depth -= 1;
                if depth == 0 {
                    end = Some(j);
                    break;
                }
            }
            j += 1;
        }
        let end = end.ok_or_else(|| format!("unclosed `${{` in {}", shown(s)))?;
        let body = &rest[body_start..end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad variable name {} in {}", shown(name), shown(s)));
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(&expand(d, lookup)?),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (used in {}; write ${{{name}:-default}} for a fallback)",
                    shown(s)
                ));
            }
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/home/u".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn test_expansion() {
        assert_eq!(expand("a/b", &env).unwrap(), "a/b");
        assert_eq!(expand("${HOME}/x", &env).unwrap(), "/home/u/x");
        assert_eq!(expand("${FIX:-${HOME}/.cache}/m", &env).unwrap(), "/home/u/.cache/m");
        assert_eq!(expand("${EMPTY:-d}", &env).unwrap(), "d");
        assert!(expand("${NOPE}/m", &env).unwrap_err().contains("NOPE is not set"));
        assert!(expand("${HOME", &env).unwrap_err().contains("unclosed"));
        assert!(expand("${a b}", &env).unwrap_err().contains("bad variable"));
        // Nesting is bounded (no stack overflow), and the message does not echo the whole text.
        let mut deep = "x".to_string();
        for _ in 0..100_000 {
            deep = format!("${{A:-{deep}}}");
        }
        let e = expand(&deep, &env).unwrap_err();
        assert!(e.contains("nested more than 16 deep") && e.len() < 200, "{e}");
        let mut ok = "x".to_string();
        for _ in 0..MAX_NESTING {
            ok = format!("${{A:-{ok}}}");
        }
        assert_eq!(expand(&ok, &env).unwrap(), "x");
    }
}
