//! Job SQL: parsing a script in Arroyo's dialect into a validated [`JobSpec`].
//!
//! A job script is a list of statements separated by `;`:
//!
//! - `CREATE TABLE name (columns, [PRIMARY KEY (..)], [WATERMARK FOR col AS expr]) WITH (options)`
//!   declares a source or a sink; the `connector` option says which ([`options`]).
//! - `CREATE VIEW name AS SELECT ...` names a query; views are handed to DataFusion as written.
//! - `INSERT INTO sink SELECT ...` is one pipeline: a query whose rows go to a sink table.
//!
//! DataFusion's SQL parser does not know the streaming DDL (`WATERMARK FOR`,
//! quoted option keys such as `'partitioning.time_pattern'`), so `CREATE TABLE`
//! is read here from sqlparser's tokens; everything else (views, queries) is
//! DataFusion SQL and is planned by [`plan`]. Positions in every error refer to
//! the script itself: statement text handed to DataFusion is padded so that
//! its own "Line: X, Column: Y" messages point at the right place.
//!
//! Parsing does no IO. `${NAME}` in option values is replaced from the
//! environment here (a missing variable is an error naming it);
//! `ENGAGE_DATA_DIR` defaults to `./data`.

mod batch_table;
pub mod check;
mod cursor;
pub mod functions;
pub mod options;
mod physical;
pub mod plan;
mod types;
pub mod view;
mod walk;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use cursor::{location_of, padded_text, Cursor, LineIndex};
pub use options::{
    CommitMode, Connector, FilesystemOptions, KafkaFormat, KafkaOptions, PostgresCdcOptions,
    RedisOptions, RedisTarget, SinkConnector, SourceConnector,
};
pub use types::{declared_type, sql_type_to_arrow, SUPPORTED_TYPES, UNCONSTRAINED_NUMERIC_SCALE};

/// A parsed and validated job script.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The job's name: names its slot, publication and checkpoint folder.
    pub name: String,
    pub tables: Vec<TableDef>,
    pub views: Vec<ViewDef>,
    pub inserts: Vec<InsertDef>,
    /// The UDFs the job's SQL can call (loaded by [`crate::udf::prepare`]).
    pub udfs: crate::udf::Udfs,
}

/// A `CREATE TABLE` with its connector.
#[derive(Debug, Clone)]
pub struct TableDef {
    pub name: String,
    /// Declared columns (empty for sinks that take the query's columns).
    pub columns: Vec<Field>,
    pub primary_key: Vec<String>,
    pub watermark: Option<WatermarkDef>,
    /// `CONSTRAINT name CHECK (expr)`: rows failing one go to the dead-letter output.
    pub checks: Vec<CheckDef>,
    pub connector: Connector,
    pub location: SqlLocation,
}

/// `CONSTRAINT name CHECK (expression)` on a source table. As in SQL, a check
/// passes when its expression is true or NULL.
#[derive(Debug, Clone)]
pub struct CheckDef {
    /// The reason code written with dead-lettered rows.
    pub name: String,
    /// DataFusion SQL over the table's columns (subqueries allowed).
    pub expression: String,
}

/// `WATERMARK FOR column AS expression`.
#[derive(Debug, Clone)]
pub struct WatermarkDef {
    pub column: String,
    pub expression: String,
}

/// A `CREATE VIEW`, kept as DataFusion SQL text (padded to its script position).
#[derive(Debug, Clone)]
pub struct ViewDef {
    pub name: String,
    pub sql: String,
    pub location: SqlLocation,
}

/// An `INSERT INTO sink SELECT ...`: the query text (padded to its script position).
#[derive(Debug, Clone)]
pub struct InsertDef {
    pub sink: String,
    pub query: String,
    pub location: SqlLocation,
}

/// Line and column (from 1) of a statement or token in the script.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SqlLocation {
    pub line: u64,
    pub column: u64,
}

impl std::fmt::Display for SqlLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Everything that can be wrong with a job script before anything connects.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("syntax error at {location}: {message}")]
    Syntax {
        location: SqlLocation,
        message: String,
    },
    #[error("table `{table}` ({location}): {message}")]
    Table {
        table: String,
        location: SqlLocation,
        message: String,
    },
    #[error(
        "environment variable `{name}` is not set (used in option `{option}` of table `{table}`)"
    )]
    MissingEnv {
        name: String,
        table: String,
        option: String,
    },
    #[error("{context}: {message}")]
    Plan { context: String, message: String },
}

impl SqlError {
    fn syntax(token: &TokenWithSpan, message: impl Into<String>) -> Self {
        SqlError::Syntax {
            location: location_of(token),
            message: message.into(),
        }
    }
}

/// Parses a job script. `job_name` names the job; `env` resolves `${NAME}`
/// (pass `|k| std::env::var(k).ok()` in production).
pub fn parse_job(
    job_name: &str,
    script: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<JobSpec, SqlError> {
    let tokens = Tokenizer::new(&GenericDialect {}, script)
        .tokenize_with_location()
        .map_err(|error| SqlError::Syntax {
            location: SqlLocation {
                line: error.location.line,
                column: error.location.column,
            },
            message: error.message.clone(),
        })?;
    let lines = LineIndex::new(script);
    let mut spec = JobSpec {
        name: job_name.to_string(),
        tables: Vec::new(),
        views: Vec::new(),
        inserts: Vec::new(),
        udfs: Vec::new(),
    };
    for statement in split_statements(&tokens) {
        parse_statement(&statement, script, &lines, env, &mut spec)?;
    }
    validate(&spec)?;
    Ok(spec)
}

/// Significant tokens of one statement (no whitespace or comments).
fn split_statements(tokens: &[TokenWithSpan]) -> Vec<Vec<TokenWithSpan>> {
    let mut statements = Vec::new();
    let mut current = Vec::new();
    let mut depth = 0i32;
    for token in tokens {
        match &token.token {
            Token::Whitespace(_) => continue,
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::SemiColon if depth <= 0 => {
                if !current.is_empty() {
                    statements.push(std::mem::take(&mut current));
                }
                continue;
            }
            Token::EOF => continue,
            _ => {}
        }
        current.push(token.clone());
    }
    if !current.is_empty() {
        statements.push(current);
    }
    statements
}

fn parse_statement(
    tokens: &[TokenWithSpan],
    script: &str,
    lines: &LineIndex,
    env: &dyn Fn(&str) -> Option<String>,
    spec: &mut JobSpec,
) -> Result<(), SqlError> {
    let mut cursor = Cursor { tokens, at: 0 };
    let first = cursor.peek_token().clone();
    if cursor.eat_keyword("CREATE") {
        if cursor.eat_keyword("TABLE") {
            let table = parse_create_table(&mut cursor, script, lines, env)?;
            spec.tables.push(table);
            return Ok(());
        }
        // `CREATE OR REPLACE VIEW` reads the same as `CREATE VIEW` here.
        let _ = cursor.eat_keyword("OR") && cursor.eat_keyword("REPLACE");
        if cursor.eat_keyword("VIEW") {
            let name = cursor.identifier("a view name")?;
            spec.views.push(ViewDef {
                name,
                sql: padded_text(script, lines, tokens),
                location: location_of(&tokens[0]),
            });
            return Ok(());
        }
        return Err(SqlError::syntax(
            cursor.peek_token(),
            "expected TABLE or VIEW after CREATE",
        ));
    }
    if cursor.eat_keyword("INSERT") {
        if !cursor.eat_keyword("INTO") {
            return Err(SqlError::syntax(
                cursor.peek_token(),
                "expected INTO after INSERT",
            ));
        }
        let sink = cursor.identifier("a sink table name")?;
        let rest = &tokens[cursor.at..];
        if rest.is_empty() {
            return Err(SqlError::syntax(
                &tokens[tokens.len() - 1],
                "expected a query after the sink table name",
            ));
        }
        spec.inserts.push(InsertDef {
            sink,
            query: padded_text(script, lines, rest),
            location: location_of(&tokens[0]),
        });
        return Ok(());
    }
    Err(SqlError::syntax(
        &first,
        format!(
            "expected CREATE TABLE, CREATE VIEW or INSERT INTO, found `{}`",
            first.token
        ),
    ))
}

fn parse_create_table(
    cursor: &mut Cursor<'_>,
    script: &str,
    lines: &LineIndex,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TableDef, SqlError> {
    let start = cursor.peek_token().clone();
    let _ = cursor.eat_keyword("IF") && cursor.eat_keyword("NOT") && cursor.eat_keyword("EXISTS");
    let name = cursor.identifier("a table name")?;
    let mut columns = Vec::new();
    let mut primary_key = Vec::new();
    let mut watermark = None;
    let mut checks = Vec::new();
    if cursor.eat(&Token::LParen) {
        loop {
            if cursor.eat(&Token::RParen) {
                break;
            }
            if cursor.eat_keyword("WATERMARK") {
                watermark = Some(parse_watermark(cursor, script, lines)?);
            } else if cursor.eat_keyword("CONSTRAINT") {
                let name = cursor.identifier("a constraint name")?;
                cursor.expect_keyword("CHECK")?;
                checks.push(CheckDef {
                    name,
                    expression: parse_parenthesised(cursor, script, lines)?,
                });
            } else if cursor.eat_keyword("CHECK") {
                checks.push(CheckDef {
                    name: format!("check_{}", checks.len() + 1),
                    expression: parse_parenthesised(cursor, script, lines)?,
                });
            } else if cursor.eat_keyword("PRIMARY") {
                cursor.expect_keyword("KEY")?;
                cursor.expect(&Token::LParen, "`(`")?;
                loop {
                    primary_key.push(cursor.identifier("a primary key column")?);
                    if cursor.eat(&Token::RParen) {
                        break;
                    }
                    cursor.expect(&Token::Comma, "`,` or `)`")?;
                }
            } else {
                let (field, is_key) = parse_column(cursor)?;
                if is_key {
                    primary_key.push(field.name().clone());
                }
                columns.push(field);
            }
            if cursor.eat(&Token::Comma) {
                continue;
            }
            cursor.expect(&Token::RParen, "`,` or `)` in the column list")?;
            break;
        }
    }
    let mut raw_options = Vec::new();
    if cursor.eat_keyword("WITH") {
        cursor.expect(&Token::LParen, "`(` after WITH")?;
        loop {
            if cursor.eat(&Token::RParen) {
                break;
            }
            let key_token = cursor.peek_token().clone();
            let key = cursor.option_key()?;
            cursor.expect(&Token::Eq, "`=` after the option name")?;
            let value = cursor.option_value()?;
            raw_options.push((key, value, location_of(&key_token)));
            if cursor.eat(&Token::Comma) {
                continue;
            }
            cursor.expect(&Token::RParen, "`,` or `)` in the WITH options")?;
            break;
        }
    }
    if let Some(extra) = cursor.tokens.get(cursor.at) {
        return Err(SqlError::syntax(
            extra,
            format!("unexpected `{}` after the table definition", extra.token),
        ));
    }
    let location = location_of(&start);
    let mut resolved = HashMap::new();
    for (key, value, key_location) in raw_options {
        let value = substitute_env(&value, env).map_err(|missing| SqlError::MissingEnv {
            name: missing,
            table: name.clone(),
            option: key.clone(),
        })?;
        if resolved.insert(key.clone(), value).is_some() {
            return Err(SqlError::Table {
                table: name.clone(),
                location: key_location,
                message: format!("option `{key}` is given twice"),
            });
        }
    }
    if !checks.is_empty() && resolved.get("connector").map(String::as_str) != Some("postgres-cdc") {
        return Err(SqlError::Table {
            table: name,
            location,
            message: "CHECK constraints apply to postgres-cdc source tables only".into(),
        });
    }
    let connector =
        options::Connector::from_options(&name, &columns, resolved).map_err(|message| {
            SqlError::Table {
                table: name.clone(),
                location,
                message,
            }
        })?;
    Ok(TableDef {
        name,
        columns,
        primary_key,
        watermark,
        checks,
        connector,
        location,
    })
}

fn parse_watermark(
    cursor: &mut Cursor<'_>,
    script: &str,
    lines: &LineIndex,
) -> Result<WatermarkDef, SqlError> {
    cursor.expect_keyword("FOR")?;
    let column = cursor.identifier("the watermark's time column")?;
    cursor.expect_keyword("AS")?;
    let start = cursor.at;
    let mut depth = 0;
    while let Some(token) = cursor.tokens.get(cursor.at) {
        match token.token {
            Token::LParen => depth += 1,
            Token::RParen if depth == 0 => break,
            Token::RParen => depth -= 1,
            Token::Comma if depth == 0 => break,
            _ => {}
        }
        cursor.at += 1;
    }
    if start == cursor.at {
        return Err(SqlError::syntax(
            cursor.peek_token(),
            "expected the watermark expression after AS",
        ));
    }
    let expression = padded_text(script, lines, &cursor.tokens[start..cursor.at])
        .trim()
        .to_string();
    Ok(WatermarkDef { column, expression })
}

/// `( expression )`: the text between balanced parentheses, padded to its position.
fn parse_parenthesised(
    cursor: &mut Cursor<'_>,
    script: &str,
    lines: &LineIndex,
) -> Result<String, SqlError> {
    cursor.expect(&Token::LParen, "`(` after CHECK")?;
    let start = cursor.at;
    let mut depth = 0;
    loop {
        let Some(token) = cursor.tokens.get(cursor.at) else {
            return Err(SqlError::syntax(
                cursor.peek_token(),
                "unclosed `(` in CHECK",
            ));
        };
        match token.token {
            Token::LParen => depth += 1,
            Token::RParen if depth == 0 => break,
            Token::RParen => depth -= 1,
            _ => {}
        }
        cursor.at += 1;
    }
    if start == cursor.at {
        return Err(SqlError::syntax(
            cursor.peek_token(),
            "empty CHECK expression",
        ));
    }
    let text = padded_text(script, lines, &cursor.tokens[start..cursor.at]);
    cursor.at += 1; // the closing parenthesis
    Ok(text)
}

/// A column definition: `name TYPE [NOT NULL | NULL] [PRIMARY KEY]`.
fn parse_column(cursor: &mut Cursor<'_>) -> Result<(Field, bool), SqlError> {
    let name_token = cursor.peek_token().clone();
    let name = cursor.identifier("a column name")?;
    let mut type_words = Vec::new();
    let mut type_args = Vec::new();
    let mut dimensions = 0;
    let type_token = cursor.peek_token().clone();
    while let Some(token) = cursor.tokens.get(cursor.at) {
        match &token.token {
            Token::Word(word) => {
                let upper = word.value.to_ascii_uppercase();
                if matches!(upper.as_str(), "NOT" | "NULL" | "PRIMARY") {
                    break;
                }
                if upper == "ARRAY" {
                    dimensions += 1;
                } else {
                    type_words.push(upper);
                }
                cursor.at += 1;
            }
            Token::LParen => {
                // A length, precision or scale: VARCHAR(255), NUMERIC(12, 2).
                cursor.at += 1;
                while !cursor.eat(&Token::RParen) {
                    match cursor.tokens.get(cursor.at).map(|t| &t.token) {
                        None => {
                            return Err(SqlError::syntax(
                                &type_token,
                                "unclosed `(` in column type",
                            ))
                        }
                        Some(Token::Number(number, _)) => type_args.push(number.clone()),
                        Some(_) => {}
                    }
                    cursor.at += 1;
                }
            }
            Token::LBracket => {
                // `TEXT[]` (a size inside the brackets is ignored, as Postgres does).
                cursor.at += 1;
                while !cursor.eat(&Token::RBracket) {
                    if cursor.tokens.get(cursor.at).is_none() {
                        return Err(SqlError::syntax(&type_token, "unclosed `[` in column type"));
                    }
                    cursor.at += 1;
                }
                dimensions += 1;
            }
            _ => break,
        }
    }
    if type_words.is_empty() {
        return Err(SqlError::syntax(
            &name_token,
            format!("column `{name}` has no type"),
        ));
    }
    let type_name = type_words.join(" ");
    let scalar = declared_type(&type_name, &type_args)
        .map_err(|message| SqlError::syntax(&type_token, format!("column `{name}`: {message}")))?;
    let data_type = match dimensions {
        0 => scalar,
        1 => DataType::List(Arc::new(Field::new("item", scalar, true))),
        _ => {
            return Err(SqlError::syntax(
                &type_token,
                format!("column `{name}`: multi-dimensional arrays are not supported"),
            ))
        }
    };
    let mut nullable = true;
    let mut is_key = false;
    loop {
        if cursor.eat_keyword("NOT") {
            cursor.expect_keyword("NULL")?;
            nullable = false;
        } else if cursor.eat_keyword("NULL") {
            nullable = true;
        } else if cursor.eat_keyword("PRIMARY") {
            cursor.expect_keyword("KEY")?;
            is_key = true;
        } else {
            break;
        }
    }
    Ok((Field::new(name, data_type, nullable), is_key))
}

/// Replaces every `${NAME}`; returns the first missing variable's name.
/// `ENGAGE_DATA_DIR` falls back to `./data`.
pub fn substitute_env(value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        let resolved =
            env(name).or_else(|| (name == "ENGAGE_DATA_DIR").then(|| "./data".to_string()));
        match resolved {
            Some(text) => out.push_str(&text),
            None => return Err(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Cross-statement checks: names unique, inserts target sink tables, and
/// CDC sources share one connection.
fn validate(spec: &JobSpec) -> Result<(), SqlError> {
    let mut seen = HashMap::new();
    for table in &spec.tables {
        if seen.insert(table.name.clone(), table.location).is_some() {
            return Err(SqlError::Table {
                table: table.name.clone(),
                location: table.location,
                message: "a table with this name is already defined".into(),
            });
        }
    }
    for view in &spec.views {
        if seen.contains_key(&view.name) {
            return Err(SqlError::Plan {
                context: format!("view `{}` ({})", view.name, view.location),
                message: "a table or view with this name is already defined".into(),
            });
        }
        seen.insert(view.name.clone(), view.location);
    }
    let mut connection: Option<&str> = None;
    for table in &spec.tables {
        if let Some(options) = table.connector.postgres_cdc() {
            match connection {
                None => connection = Some(options.connection.expose()),
                Some(first) if first != options.connection.expose() => {
                    return Err(SqlError::Table {
                        table: table.name.clone(),
                        location: table.location,
                        message: "all postgres-cdc tables of a job must use the same connection \
                                  (one replication slot reads them in commit order)"
                            .into(),
                    })
                }
                Some(_) => {}
            }
            if table.columns.is_empty() {
                return Err(SqlError::Table {
                    table: table.name.clone(),
                    location: table.location,
                    message: "a postgres-cdc table must declare its columns".into(),
                });
            }
        }
    }
    if spec.inserts.is_empty() {
        return Err(SqlError::Plan {
            context: "job".into(),
            message: "the script has no INSERT INTO statement, so the job would produce nothing"
                .into(),
        });
    }
    let mut sinks_used = HashMap::new();
    for insert in &spec.inserts {
        let Some(table) = spec.tables.iter().find(|t| t.name == insert.sink) else {
            return Err(SqlError::Plan {
                context: format!("INSERT INTO {} ({})", insert.sink, insert.location),
                message: format!("no table named `{}` is defined", insert.sink),
            });
        };
        if table.connector.as_source().is_some() {
            return Err(SqlError::Plan {
                context: format!("INSERT INTO {} ({})", insert.sink, insert.location),
                message: "a postgres-cdc table is a source and cannot be written to".into(),
            });
        }
        if sinks_used.insert(insert.sink.clone(), ()).is_some() {
            return Err(SqlError::Plan {
                context: format!("INSERT INTO {} ({})", insert.sink, insert.location),
                message: "each sink table takes exactly one INSERT (use UNION ALL in one query)"
                    .into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
