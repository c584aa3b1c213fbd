//! Parameter selectors: which tensors a pass touches (`targets`, `ignore`).
//!
//! A pattern is either a glob over the full tensor name (`*.mlp.*.weight`, `lm_head.weight`) or,
//! with a `re:` prefix, a regular expression that must match the whole name
//! (`re:.*layers\.[0-3]\..*weight$`) — the same `re:` convention llm-compressor recipes use.

use globset::{GlobBuilder, GlobMatcher};
use regex::Regex;

/// One compiled pattern.
#[derive(Clone, Debug)]
enum Pattern {
    Glob(GlobMatcher),
    Re(Regex),
}

impl Pattern {
    fn parse(p: &str) -> Result<Self, String> {
        if let Some(re) = p.strip_prefix("re:") {
            Regex::new(&format!("^(?:{re})$")).map(Pattern::Re).map_err(|e| format!("bad regex {p:?}: {e}"))
        } else {
            GlobBuilder::new(p)
                .literal_separator(false)
                .build()
                .map(|g| Pattern::Glob(g.compile_matcher()))
                .map_err(|e| format!("bad glob {p:?}: {e}"))
        }
    }

    fn is_match(&self, name: &str) -> bool {
        match self {
            Pattern::Glob(g) => g.is_match(name),
            Pattern::Re(r) => r.is_match(name),
        }
    }
}

/// `targets` + `ignore` of a pass.
#[derive(Clone, Debug)]
pub struct ParamSelector {
    targets: Option<Vec<Pattern>>,
    ignore: Vec<Pattern>,
}

impl ParamSelector {
    /// Compiles the patterns; `targets = None` means the pass's default set. Errors name the field.
    pub fn new(targets: Option<&[String]>, ignore: &[String]) -> Result<Self, String> {
        let targets = targets
            .map(|t| {
                t.iter().map(|p| Pattern::parse(p).map_err(|e| format!("targets: {e}"))).collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let ignore =
            ignore.iter().map(|p| Pattern::parse(p).map_err(|e| format!("ignore: {e}"))).collect::<Result<_, _>>()?;
        Ok(Self { targets, ignore })
    }

    /// `Some(explicit)` when the name is selected (`explicit`: matched a `targets` pattern rather
    /// than the default), `None` when it is not selected or is ignored.
    pub fn select(&self, name: &str, default: bool) -> Option<bool> {
        if self.ignore.iter().any(|p| p.is_match(name)) {
            return None;
        }
        match &self.targets {
            Some(t) => t.iter().any(|p| p.is_match(name)).then_some(true),
            None => default.then_some(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_glob_regex_and_ignore() {
        let s = ParamSelector::new(Some(&["re:.*weight$".into(), "*.bias".into()]), &["lm_head*".into()]).unwrap();
        assert_eq!(s.select("fc1.weight", false), Some(true));
        assert_eq!(s.select("fc1.bias", false), Some(true));
        assert_eq!(s.select("lm_head.weight", true), None);
        assert_eq!(s.select("fc1.weight_x", true), None);
        let d = ParamSelector::new(None, &[]).unwrap();
        assert_eq!(d.select("x", true), Some(false));
        assert_eq!(d.select("x", false), None);
    }

    #[test]
    fn test_bad_patterns_name_field() {
        assert!(ParamSelector::new(Some(&["re:(".into()]), &[]).unwrap_err().starts_with("targets: bad regex"));
        assert!(ParamSelector::new(None, &["a[".into()]).unwrap_err().starts_with("ignore: bad glob"));
    }
}
