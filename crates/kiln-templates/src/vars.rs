//! Variable expansion (`$A`, `${A}`, `${A:-default}`, `${A:+alt}`, `\$`) and
//! shell quoting.

/// Expands variable references in `text`; unknown variables expand to
/// nothing, `\$` is a literal `$`.
pub fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && chars.get(i + 1) == Some(&'$') {
            out.push('$');
            i += 2;
            continue;
        }
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('{') => {
                let Some(close) = chars[i + 2..].iter().position(|&c| c == '}') else {
                    out.extend(&chars[i..]);
                    break;
                };
                let inner: String = chars[i + 2..i + 2 + close].iter().collect();
                i += close + 3;
                let (name, op) = match inner.find(":-").or_else(|| inner.find(":+")) {
                    Some(p) => (&inner[..p], Some((&inner[p..p + 2], &inner[p + 2..]))),
                    None => (inner.as_str(), None),
                };
                let value = lookup(name).filter(|v| !v.is_empty());
                match op {
                    None => out.push_str(&value.unwrap_or_default()),
                    Some((":-", word)) => match value {
                        Some(v) => out.push_str(&v),
                        None => out.push_str(&expand(word, lookup)),
                    },
                    Some((_, word)) => {
                        if value.is_some() {
                            out.push_str(&expand(word, lookup));
                        }
                    }
                }
            }
            Some(&n) if n.is_ascii_alphabetic() || n == '_' => {
                let start = i + 1;
                let mut end = start;
                while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_')
                {
                    end += 1;
                }
                let name: String = chars[start..end].iter().collect();
                out.push_str(&lookup(&name).unwrap_or_default());
                i = end;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    out
}

/// `s` as one shell word.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `name` can be an environment variable name.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("1".into()),
            "PATH" => Some("/bin".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands() {
        assert_eq!(expand("x$A-${A}y", &env), "x1-1y");
        assert_eq!(expand("$PATH:/opt", &env), "/bin:/opt");
        assert_eq!(expand("${NOPE:-d}|${A:-d}|${EMPTY:-e}", &env), "d|1|e");
        assert_eq!(expand("${A:+set}|${NOPE:+set}", &env), "set|");
        assert_eq!(expand(r"\$A costs $5 $", &env), "$A costs $5 $");
        assert_eq!(expand("$NOPE.", &env), ".");
        assert_eq!(expand("${A", &env), "${A");
    }

    #[test]
    fn quotes() {
        assert_eq!(shell_quote("abc/d.e"), "abc/d.e");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
