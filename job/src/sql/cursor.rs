//! Walking the tokens of a job SQL statement: a cursor over them, and where
//! each one is in the file (line and column, for error messages).

use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan};

use super::{SqlError, SqlLocation};

pub(super) fn location_of(token: &TokenWithSpan) -> SqlLocation {
    SqlLocation {
        line: token.span.start.line,
        column: token.span.start.column,
    }
}

/// The script text from the first to the last token, preceded by newlines and
/// spaces so that it starts at the same line and column as in the script.
pub(super) fn padded_text(script: &str, lines: &LineIndex, tokens: &[TokenWithSpan]) -> String {
    let (Some(first), Some(last)) = (tokens.first(), tokens.last()) else {
        return String::new();
    };
    let start = lines.offset(first.span.start.line, first.span.start.column, script);
    let end = lines.offset(last.span.end.line, last.span.end.column, script);
    let mut text = String::new();
    for _ in 1..first.span.start.line {
        text.push('\n');
    }
    for _ in 1..first.span.start.column {
        text.push(' ');
    }
    text.push_str(&script[start..end.max(start)]);
    text
}

/// Byte offsets of line starts, to turn (line, column) into a byte offset.
pub(super) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(super) fn new(script: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(script.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    pub(super) fn offset(&self, line: u64, column: u64, script: &str) -> usize {
        let line_start = self
            .starts
            .get(line.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(script.len());
        let line_text = &script[line_start..];
        line_text
            .char_indices()
            .nth(column.saturating_sub(1) as usize)
            .map(|(i, _)| line_start + i)
            .unwrap_or(script.len())
    }
}

/// A cursor over one statement's significant tokens.
pub(super) struct Cursor<'a> {
    pub(super) tokens: &'a [TokenWithSpan],
    pub(super) at: usize,
}

static END: std::sync::LazyLock<TokenWithSpan> =
    std::sync::LazyLock::new(|| TokenWithSpan::wrap(Token::EOF));

impl<'a> Cursor<'a> {
    pub(super) fn peek_token(&self) -> &TokenWithSpan {
        self.tokens
            .get(self.at)
            .unwrap_or_else(|| self.tokens.last().unwrap_or(&END))
    }

    pub(super) fn eat(&mut self, expected: &Token) -> bool {
        if self.tokens.get(self.at).map(|t| &t.token) == Some(expected) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    pub(super) fn expect(&mut self, expected: &Token, what: &str) -> Result<(), SqlError> {
        if self.eat(expected) {
            Ok(())
        } else {
            let found = self.peek_token();
            Err(SqlError::syntax(
                found,
                format!("expected {what}, found `{}`", found.token),
            ))
        }
    }

    pub(super) fn eat_keyword(&mut self, keyword: &str) -> bool {
        match self.tokens.get(self.at).map(|t| &t.token) {
            Some(Token::Word(word))
                if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(keyword) =>
            {
                self.at += 1;
                true
            }
            _ => false,
        }
    }

    pub(super) fn expect_keyword(&mut self, keyword: &str) -> Result<(), SqlError> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            let found = self.peek_token();
            Err(SqlError::syntax(
                found,
                format!("expected {keyword}, found `{}`", found.token),
            ))
        }
    }

    /// An identifier; unquoted ones are folded to lower case as DataFusion does.
    pub(super) fn identifier(&mut self, what: &str) -> Result<String, SqlError> {
        match self.tokens.get(self.at).map(|t| &t.token) {
            Some(Token::Word(word)) => {
                self.at += 1;
                Ok(if word.quote_style.is_some() {
                    word.value.clone()
                } else {
                    word.value.to_ascii_lowercase()
                })
            }
            _ => {
                let found = self.peek_token();
                Err(SqlError::syntax(
                    found,
                    format!("expected {what}, found `{}`", found.token),
                ))
            }
        }
    }

    /// An option name: `word`, `dotted.word` or `'quoted.name'`.
    pub(super) fn option_key(&mut self) -> Result<String, SqlError> {
        if let Some(Token::SingleQuotedString(text)) = self.tokens.get(self.at).map(|t| &t.token) {
            self.at += 1;
            return Ok(text.clone());
        }
        let mut key = self.identifier("an option name")?;
        while self.eat(&Token::Period) {
            key.push('.');
            key.push_str(&self.identifier("an option name after `.`")?);
        }
        Ok(key)
    }

    /// An option value: a quoted string, a number or a bare word (true/false).
    pub(super) fn option_value(&mut self) -> Result<String, SqlError> {
        let token = self.peek_token().clone();
        let value = match &token.token {
            Token::SingleQuotedString(text) => text.clone(),
            Token::Number(text, _) => text.clone(),
            Token::Word(word) => word.value.clone(),
            other => {
                return Err(SqlError::syntax(
                    &token,
                    format!(
                        "expected an option value (a quoted string or a number), found `{other}`"
                    ),
                ))
            }
        };
        self.at += 1;
        Ok(value)
    }
}
