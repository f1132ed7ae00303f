//! Windowed aggregation: how a query with `tumble`/`hop` in its `GROUP BY` is split.
//!
//! DataFusion plans the whole query. Each `Aggregate` node grouped by a
//! window function is then cut out and replaced by three parts:
//!
//! 1. a **pre-plan**: the aggregate's input (joins, filters, derived columns)
//!    projected to `[group keys.., event time, aggregate arguments.., filters..]`,
//!    run by DataFusion on every change batch;
//! 2. **window state** ([`crate::engine::window`]): per-slide partial
//!    aggregates and running totals, kept by the engine and checkpointed;
//! 3. a **post-plan**: the rest of the query (HAVING, `ROW_NUMBER() OVER
//!    (PARTITION BY window ...)`, `WHERE rank <= N`, projections), run by
//!    DataFusion over the rows of each window as it closes. The aggregate node
//!    is replaced by a scan of a [`BatchTable`] holding those rows, renamed to
//!    the aggregate's own output schema.
//!
//! `tumble(width)` and `hop(slide, width)` take no time column: windows are on
//! the event time of the driving table's `WATERMARK` column, which must reach
//! the aggregate's input (Arroyo's semantics). They return a struct
//! `{start, end}` (UTC timestamps); `window.start` and `window.end` read it.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarUDF, Volatility,
};

use super::plan::BatchTable;

/// The `{start, end}` struct a window function returns.
pub fn window_type() -> DataType {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    DataType::Struct(Fields::from(vec![
        Field::new("start", time.clone(), false),
        Field::new("end", time, false),
    ]))
}

/// `tumble(width)` and `hop(slide, width)`: markers recognised in `GROUP BY`.
pub fn window_udfs() -> Vec<ScalarUDF> {
    let interval = DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano);
    let refuse = |name: &'static str| {
        Arc::new(move |_: &[ColumnarValue]| {
            datafusion::common::plan_err!(
                "{name}() can only be used in the GROUP BY of a streaming query"
            )
        })
    };
    vec![
        create_udf(
            "tumble",
            vec![interval.clone()],
            window_type(),
            Volatility::Immutable,
            refuse("tumble"),
        ),
        create_udf(
            "hop",
            vec![interval.clone(), interval],
            window_type(),
            Volatility::Immutable,
            refuse("hop"),
        ),
    ]
}

/// A window's shape, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Tumble { width: i64 },
    Hop { slide: i64, width: i64 },
}

impl WindowKind {
    /// The granularity of partial aggregates: windows start and end on multiples of it.
    pub fn slide(&self) -> i64 {
        match *self {
            WindowKind::Tumble { width } => width,
            WindowKind::Hop { slide, .. } => slide,
        }
    }

    pub fn width(&self) -> i64 {
        match *self {
            WindowKind::Tumble { width } | WindowKind::Hop { width, .. } => width,
        }
    }
}

/// Supported aggregate functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    Count,
    CountDistinct,
    Sum,
    Avg,
    Min,
    Max,
    /// A UDAF from a plugin ([`AggSpec::udaf`]): the window keeps its
    /// group's values and calls it as the window closes.
    Udaf,
}

impl AggKind {
    /// Whether a delete or update can take a contribution back out.
    pub fn retracts(&self) -> bool {
        !matches!(self, AggKind::Min | AggKind::Max)
    }
}

/// One aggregate of a windowed `GROUP BY`.
#[derive(Debug, Clone, PartialEq)]
pub struct AggSpec {
    pub kind: AggKind,
    /// Column of the argument in the pre-plan's output (None: `count(*)`).
    pub argument: Option<usize>,
    /// Column of the `FILTER (WHERE ...)` condition in the pre-plan's output.
    pub filter: Option<usize>,
    /// The aggregate's output type.
    pub output_type: DataType,
    /// The scale of a decimal argument of `sum`/`avg`: such sums are kept
    /// exactly, as integers of that scale.
    pub decimal_scale: Option<i8>,
    /// The plugin UDAF of an [`AggKind::Udaf`].
    pub udaf: Option<crate::udf::UdfRef>,
}

/// One windowed aggregate node of a query.
#[derive(Debug)]
pub struct WindowedAggregate {
    pub kind: WindowKind,
    /// `[keys.., event time, arguments.., filters..]` per change batch (optimised).
    pub pre_plan: LogicalPlan,
    pub key_count: usize,
    /// Index of the event time column in the pre-plan's output.
    pub time_column: usize,
    /// Position of the window struct among the group expressions.
    pub window_position: usize,
    pub aggregates: Vec<AggSpec>,
    /// Arrow schema of the aggregate's output (`[group exprs.., aggregates..]`), generic names.
    pub output_schema: SchemaRef,
    /// Holds the rows of a closing window for the post-plan.
    pub table: Arc<BatchTable>,
}

impl WindowedAggregate {
    /// Whether `other`, fed the same input, keeps exactly the same state: the
    /// same pre-plan, window and aggregates (only the post-plans differ). The
    /// engine then keeps one state for both (the mission SQL writes each KPI
    /// window to Parquet and to Redis).
    pub fn same_state_as(&self, other: &WindowedAggregate) -> bool {
        self.kind == other.kind
            && self.key_count == other.key_count
            && self.time_column == other.time_column
            && self.window_position == other.window_position
            && self.aggregates == other.aggregates
            && self.output_schema == other.output_schema
            && self.pre_plan == other.pre_plan
    }
}

/// Replaces every view scan by the view's own plan, so windowed aggregates
/// defined in views become visible.
pub fn inline_views(plan: LogicalPlan) -> datafusion::common::Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::TableScan(scan) = &node else {
            return Ok(Transformed::no(node));
        };
        let Some(view) = source_as_provider(&scan.source)
            .ok()
            .and_then(|p| p.get_logical_plan().map(|v| v.into_owned()))
        else {
            return Ok(Transformed::no(node));
        };
        let mut builder =
            LogicalPlanBuilder::from(inline_views(view)?).alias(scan.table_name.clone())?;
        if let Some(projection) = &scan.projection {
            let schema = builder.schema().clone();
            let columns: Vec<Expr> = projection
                .iter()
                .map(|&i| Expr::Column(Column::from(schema.qualified_field(i))))
                .collect();
            builder = builder.project(columns)?;
        }
        for filter in &scan.filters {
            builder = builder.filter(filter.clone())?;
        }
        Ok(Transformed::yes(builder.build()?))
    })
    .map(|t| t.data)
}

/// Finds the windowed aggregates of `plan` (views already inlined) and returns
/// them with the post-plan in which each is replaced by a scan of its table.
/// `time_column` is the driving table's watermark column.
pub fn split_windows(
    plan: LogicalPlan,
    time_column: Option<&str>,
) -> Result<(Vec<WindowedAggregate>, LogicalPlan), String> {
    let mut aggregates = Vec::new();
    let mut failure = None;
    let post = plan
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::Aggregate(aggregate) = &node else {
                return Ok(Transformed::no(node));
            };
            let window_exprs: Vec<usize> = aggregate
                .group_expr
                .iter()
                .enumerate()
                .filter(|(_, e)| window_call(e).is_some())
                .map(|(i, _)| i)
                .collect();
            if window_exprs.is_empty() {
                return Ok(Transformed::no(node));
            }
            match cut_aggregate(aggregate, &window_exprs, time_column, aggregates.len()) {
                Ok((windowed, replacement)) => {
                    aggregates.push(windowed);
                    Ok(Transformed::yes(replacement))
                }
                Err(message) => {
                    failure.get_or_insert(message);
                    Ok(Transformed::no(node))
                }
            }
        })
        .map_err(|e| e.to_string())?
        .data;
    if let Some(message) = failure {
        return Err(message);
    }
    Ok((aggregates, post))
}

/// The window function call in a group expression, if it is one.
fn window_call(expr: &Expr) -> Option<(&str, &[Expr])> {
    let expr = match expr {
        Expr::Alias(alias) => alias.expr.as_ref(),
        other => other,
    };
    match expr {
        Expr::ScalarFunction(call) if matches!(call.func.name(), "tumble" | "hop") => {
            Some((call.func.name(), call.args.as_slice()))
        }
        _ => None,
    }
}

fn interval_micros(expr: &Expr) -> Result<i64, String> {
    let expr = match expr {
        Expr::Cast(cast) => cast.expr.as_ref(),
        other => other,
    };
    match expr {
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _) if v.months == 0 => {
            let micros = v.days as i64 * 86_400_000_000 + v.nanoseconds / 1_000;
            if micros > 0 {
                Ok(micros)
            } else {
                Err("window intervals must be positive".into())
            }
        }
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(_)), _) => {
            Err("window intervals cannot be in months or years (their length varies)".into())
        }
        other => Err(format!(
            "window sizes must be INTERVAL literals, found `{other}`"
        )),
    }
}

fn cut_aggregate(
    aggregate: &datafusion::logical_expr::Aggregate,
    window_exprs: &[usize],
    time_column: Option<&str>,
    index: usize,
) -> Result<(WindowedAggregate, LogicalPlan), String> {
    if window_exprs.len() > 1 {
        return Err("a GROUP BY can hold only one window function".into());
    }
    let window_position = window_exprs[0];
    let (name, args) = window_call(&aggregate.group_expr[window_position]).expect("checked");
    let kind = match (name, args) {
        ("tumble", [width]) => WindowKind::Tumble {
            width: interval_micros(width)?,
        },
        ("hop", [slide, width]) => {
            let (slide, width) = (interval_micros(slide)?, interval_micros(width)?);
            if width % slide != 0 {
                return Err(format!(
                    "hop width ({} ms) must be a multiple of its slide ({} ms)",
                    width / 1000,
                    slide / 1000
                ));
            }
            WindowKind::Hop { slide, width }
        }
        _ => {
            return Err(format!(
                "wrong arguments for {name}(): use tumble(width) or hop(slide, width)"
            ))
        }
    };
    let time_column = time_column.ok_or_else(|| {
        "windows are on event time: declare `WATERMARK FOR <column> AS <column> - INTERVAL '...'` on the \
         driving table"
            .to_string()
    })?;
    let input_schema = aggregate.input.schema();
    let time_index = input_schema
        .fields()
        .iter()
        .position(|f| f.name() == time_column)
        .ok_or_else(|| {
            format!(
                "the windowed aggregate's input must include the event time column `{time_column}`"
            )
        })?;
    let mut projection: Vec<Expr> = Vec::new();
    for (i, expr) in aggregate.group_expr.iter().enumerate() {
        if i != window_position {
            projection.push(expr.clone().alias(format!("_key{i}")));
        }
    }
    let key_count = projection.len();
    projection
        .push(Expr::Column(Column::from(input_schema.qualified_field(time_index))).alias("_time"));
    let time_position = key_count;
    let mut specs = Vec::new();
    let mut filters = Vec::new();
    let output_fields = aggregate.schema.fields();
    let group_count = aggregate.group_expr.len();
    for (i, expr) in aggregate.aggr_expr.iter().enumerate() {
        let expr = match expr {
            Expr::Alias(alias) => alias.expr.as_ref(),
            other => other,
        };
        let Expr::AggregateFunction(call) = expr else {
            return Err(format!("unsupported aggregate expression `{expr}`"));
        };
        let params = &call.params;
        if !params.order_by.is_empty() {
            return Err(format!(
                "ORDER BY inside `{expr}` is not supported in windows"
            ));
        }
        let name = call.func.name().to_ascii_lowercase();
        let udaf = crate::udf::functions::PluginFunction::udf_of(&call.func);
        let kind = match (name.as_str(), params.distinct) {
            (_, true) if udaf.is_some() => {
                return Err(format!("DISTINCT is not supported for the UDAF `{expr}` in windows"))
            }
            _ if udaf.is_some() => AggKind::Udaf,
            ("count", false) => AggKind::Count,
            ("count", true) => AggKind::CountDistinct,
            ("sum", false) => AggKind::Sum,
            ("avg" | "mean", false) => AggKind::Avg,
            ("min", _) => AggKind::Min,
            ("max", _) => AggKind::Max,
            _ => {
                return Err(format!(
                    "`{expr}` is not supported in windows; supported: count, count(DISTINCT ..), sum, avg, min, max, and UDAFs"
                ))
            }
        };
        let argument = match params.args.as_slice() {
            [] => None,
            [Expr::Literal(_, _)] if kind == AggKind::Count => None,
            [arg] => {
                projection.push(arg.clone().alias(format!("_arg{i}")));
                Some(projection.len() - 1)
            }
            _ => return Err(format!("`{expr}` takes one argument in windows")),
        };
        if let Some(filter) = &params.filter {
            filters.push((
                specs.len(),
                filter.as_ref().clone().alias(format!("_filter{i}")),
            ));
        }
        specs.push(AggSpec {
            kind,
            argument,
            filter: None,
            output_type: output_fields[group_count + i].data_type().clone(),
            decimal_scale: None,
            udaf: udaf.map(crate::udf::UdfRef),
        });
    }
    for (spec, filter) in filters {
        projection.push(filter);
        specs[spec].filter = Some(projection.len() - 1);
    }
    let pre_plan = LogicalPlanBuilder::from(aggregate.input.as_ref().clone())
        .project(projection)
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    for spec in &mut specs {
        let Some(argument) = spec.argument else {
            continue;
        };
        let argument_type = pre_plan.schema().field(argument).data_type();
        match (spec.kind, argument_type) {
            (AggKind::Sum | AggKind::Avg, &DataType::Decimal128(_, scale)) => {
                spec.decimal_scale = Some(scale)
            }
            (AggKind::Min | AggKind::Max, &DataType::Decimal128(precision, scale))
                if precision > 15 =>
            {
                return Err(format!(
                    "min/max over a DECIMAL({precision}, {scale}) in a window would go through a \
                     double and could lose digits (more than 15); CAST the argument to \
                     DECIMAL(15, {}) or to DOUBLE",
                    scale.min(15)
                ));
            }
            _ => {}
        }
    }

    // The aggregate's output, with generic column names, and the post-plan node
    // that renames it back to the aggregate's (qualified) schema.
    let fields: Vec<Field> = output_fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let data_type = if i == window_position {
                window_type()
            } else {
                f.data_type().clone()
            };
            Field::new(format!("c{i}"), data_type, true)
        })
        .collect();
    let output_schema = Arc::new(Schema::new(fields));
    let table = Arc::new(BatchTable::new(output_schema.clone()));
    let scan = LogicalPlanBuilder::scan(
        format!("__window_{index}"),
        provider_as_source(table.clone()),
        None,
    )
    .map_err(|e| e.to_string())?;
    let renames: Vec<Expr> = (0..output_schema.fields().len())
        .map(|i| {
            let (qualifier, field) = aggregate.schema.qualified_field(i);
            Expr::Column(Column::new(
                Some(format!("__window_{index}")),
                format!("c{i}"),
            ))
            .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect();
    let replacement = scan
        .project(renames)
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    Ok((
        WindowedAggregate {
            kind,
            pre_plan,
            key_count,
            time_column: time_position,
            window_position,
            aggregates: specs,
            output_schema,
            table,
        },
        replacement,
    ))
}

/// Whether any node of `plan` reads a table other than window tables.
pub fn reads_sources(plan: &LogicalPlan) -> Option<String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let name = scan.table_name.table();
            if !name.starts_with("__window_") {
                found = Some(name.to_string());
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}
