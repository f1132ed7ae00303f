//! Planning: a [`JobSpec`] becomes DataFusion logical plans, once per job.
//!
//! Each `postgres-cdc` table is registered in the job's DataFusion session as
//! a [`BatchTable`]: a table whose contents the engine sets right before it
//! runs a query. Every `INSERT` is planned and optimised once; per micro-batch
//! only physical planning and execution run.
//!
//! # Driving tables and dimensions
//!
//! In each query the first table of the `FROM` clause (after expanding views)
//! *drives* it: the query runs once per batch of that table's changes, over
//! just those rows. Every other CDC table the query reads is a *dimension*:
//! it is read as a whole, as it stood when the batch's changes committed (the
//! engine keeps it in memory, updated in commit order). So
//! `engagement_events e LEFT JOIN content c` runs per batch of events and
//! looks each event's content up as of the event's commit. A dimension needs
//! a `PRIMARY KEY`, since its changes are applied by key.
//!
//! Streaming aggregation needs windows and state; until windows exist a query
//! with `GROUP BY`, aggregates, `ORDER BY`, `LIMIT`, `DISTINCT` or window
//! functions is refused at plan time rather than computed per batch.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

pub use super::batch_table::BatchTable;
use super::check::{plan_checks, CheckPlan};
use super::physical::PhysicalPlans;
use super::view::{materialize, MaterializedView};
pub(crate) use super::walk::{
    collect_tables, leftmost_table, refuse_unwindowed_state, sorted_by_position,
};
use super::window::{inline_views, reads_sources, split_windows, WindowedAggregate};
use super::{Connector, JobSpec, SinkConnector, SqlError, TableDef};
use crate::change::metadata_fields;

/// A CDC source table of the job.
#[derive(Debug)]
pub struct SourceTable {
    pub def: TableDef,
    /// Declared columns only.
    pub declared: SchemaRef,
    /// Declared columns then the metadata columns (`_op`, `_lsn`, ...).
    pub schema: SchemaRef,
    /// Indexes (in `declared`) of the primary key columns.
    pub primary_key: Vec<usize>,
    pub provider: Arc<BatchTable>,
    /// True when some query reads this table as a dimension.
    pub is_dimension: bool,
}

/// A sink table of the job.
#[derive(Debug, Clone)]
pub struct SinkTable {
    pub def: TableDef,
    /// The def's connector, known to be a sink's.
    pub connector: SinkConnector,
}

/// One `INSERT INTO sink SELECT ...`, planned.
#[derive(Debug)]
pub struct QueryPlan {
    pub sink: usize,
    pub driving: usize,
    pub dimensions: Vec<usize>,
    /// Stateless queries: the whole query. Windowed queries: the post-plan,
    /// run over the rows of each closing window.
    pub plan: LogicalPlan,
    /// The shared view the query reads as its input, if any (its rows, not
    /// the driving table's, are the query's input).
    pub view: Option<usize>,
    /// The windowed aggregates of the query (empty for stateless queries).
    pub windows: Vec<WindowedAggregate>,
    /// How far the watermark trails the newest event time (microseconds).
    pub watermark_delay: i64,
    /// What the sink receives: strings as Utf8, timestamps as UTC microseconds, all nullable.
    pub output_schema: SchemaRef,
    /// For filesystem sinks: the output column naming the time partition;
    /// for Kafka sinks: the column holding the message timestamp.
    pub time_column: Option<usize>,
}

impl QueryPlan {
    pub fn is_windowed(&self) -> bool {
        !self.windows.is_empty()
    }
}

/// Everything the engine needs to execute a job's queries.
pub struct JobPlan {
    pub ctx: SessionContext,
    pub sources: Vec<SourceTable>,
    pub sinks: Vec<SinkTable>,
    pub queries: Vec<QueryPlan>,
    /// Views computed once per batch and shared by the queries reading them.
    pub views: Vec<MaterializedView>,
    /// Per source: its CHECK constraints, planned.
    pub checks: Vec<Option<CheckPlan>>,
    /// The UDFs registered with `ctx`.
    pub udfs: crate::udf::Udfs,
    /// The physical plans of the logical plans above, made on first use.
    physical: PhysicalPlans,
}

impl std::fmt::Debug for JobPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobPlan")
            .field("sources", &self.sources.len())
            .field("sinks", &self.sinks.len())
            .field("queries", &self.queries)
            .finish()
    }
}

impl JobPlan {
    /// Plans every statement of `spec`. No IO: sources and sinks are not contacted.
    pub async fn new(spec: &JobSpec) -> Result<JobPlan, SqlError> {
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_information_schema(false)
            .set_bool("datafusion.sql_parser.map_string_types_to_utf8view", false)
            // Physical plans are reused for every batch (physical.rs), and
            // a dynamic filter holds one run's values.
            .set_bool("datafusion.optimizer.enable_dynamic_filter_pushdown", false);
        let ctx = SessionContext::new_with_config(config);
        ctx.register_udf(super::functions::engagement_pct_udf());
        for udf in super::window::window_udfs() {
            ctx.register_udf(udf);
        }
        crate::udf::functions::register(&ctx, &spec.udfs);

        let mut sources = Vec::new();
        let mut sinks = Vec::new();
        for def in &spec.tables {
            match &def.connector {
                Connector::Source(_) => {
                    let source = source_table(def)?;
                    ctx.register_table(def.name.as_str(), source.provider.clone())
                        .map_err(|e| plan_error(format!("table `{}`", def.name), e))?;
                    sources.push(source);
                }
                Connector::Sink(connector) => sinks.push(SinkTable {
                    def: def.clone(),
                    connector: connector.clone(),
                }),
            }
        }
        let checks = plan_checks(&ctx, &mut sources).await?;
        let mut views = Vec::new();
        for view in &spec.views {
            let context = format!("view `{}` ({})", view.name, view.location);
            ctx.sql(&view.sql)
                .await
                .map_err(|e| plan_error(context.clone(), e))?;
            if let Some(materialized) = materialize(&ctx, &view.name, &sources)
                .await
                .map_err(|e| plan_error(context, e))?
            {
                for &d in &materialized.dimensions {
                    sources[d].is_dimension = true;
                }
                views.push(materialized);
            }
        }
        let mut queries = Vec::new();
        for insert in &spec.inserts {
            let context = format!("INSERT INTO {} ({})", insert.sink, insert.location);
            let frame = ctx
                .sql(&insert.query)
                .await
                .map_err(|e| plan_error(context.clone(), e))?;
            let plan = inline_views(frame.logical_plan().clone())
                .map_err(|e| plan_error(context.clone(), e))?;
            let driving_name = leftmost_table(&plan).ok_or_else(|| SqlError::Plan {
                context: context.clone(),
                message: "the query reads no table".into(),
            })?;
            let view = views.iter().position(|v| v.name == driving_name);
            let driving = sources
                .iter()
                .position(|s| s.def.name == driving_name)
                .or_else(|| view.map(|v| views[v].driving))
                .ok_or_else(|| SqlError::Plan {
                    context: context.clone(),
                    message: format!(
                        "the first table of the query, `{driving_name}`, must be a postgres-cdc table \
                         (its changes drive the query)"
                    ),
                })?;
            let mut referenced = Vec::new();
            collect_tables(&plan, &mut referenced);
            let mut dimensions = BTreeSet::new();
            for name in referenced.iter().filter(|name| **name != driving_name) {
                if let Some(index) = sources.iter().position(|s| &s.def.name == name) {
                    if sources[index].primary_key.is_empty() {
                        return Err(SqlError::Plan {
                            context,
                            message: format!(
                                "`{name}` is joined as a dimension (looked up as of each change's commit) \
                                 and needs a PRIMARY KEY in its CREATE TABLE"
                            ),
                        });
                    }
                    dimensions.insert(index);
                }
            }
            let plan_error_here = |message: String| SqlError::Plan {
                context: context.clone(),
                message,
            };
            let watermark = sources[driving].def.watermark.as_ref();
            let watermark_delay = match watermark {
                Some(w) => watermark_delay(&w.column, &w.expression).map_err(plan_error_here)?,
                None => 0,
            };
            let (mut windows, post) =
                split_windows(plan.clone(), watermark.map(|w| w.column.as_str()))
                    .map_err(plan_error_here)?;
            let self_join = |plan: &LogicalPlan| {
                let mut tables = Vec::new();
                collect_tables(plan, &mut tables);
                if tables.iter().filter(|name| **name == driving_name).count() > 1 {
                    return Err(plan_error_here(format!(
                        "`{driving_name}` drives the query and cannot also be joined to itself"
                    )));
                }
                Ok(())
            };
            let optimized = if windows.is_empty() {
                self_join(&plan)?;
                refuse_unwindowed_state(&plan).map_err(plan_error_here)?;
                // A view's rows are sorted after it runs (execute_view); a
                // query joining without one sorts its own.
                let plan = if view.is_none() && !dimensions.is_empty() {
                    sorted_by_position(plan).map_err(|e| plan_error(context.clone(), e))?
                } else {
                    plan
                };
                ctx.state()
                    .optimize(&plan)
                    .map_err(|e| plan_error(context.clone(), e))?
            } else {
                if let Some(table) = reads_sources(&post) {
                    return Err(plan_error_here(format!(
                        "`{table}` is read outside the windowed aggregation; a query with windows must \
                         aggregate all of its input over windows"
                    )));
                }
                for window in &mut windows {
                    self_join(&window.pre_plan)?;
                    refuse_unwindowed_state(&window.pre_plan).map_err(plan_error_here)?;
                    if leftmost_table(&window.pre_plan).as_deref() != Some(driving_name.as_str()) {
                        return Err(plan_error_here(format!(
                            "every windowed aggregate of the query must be driven by `{driving_name}`"
                        )));
                    }
                    window.pre_plan = ctx
                        .state()
                        .optimize(&window.pre_plan)
                        .map_err(|e| plan_error(context.clone(), e))?;
                    for aggregate in &window.aggregates {
                        if !aggregate.kind.retracts() {
                            tracing::warn!(
                                query = %context,
                                "min/max cannot take back deleted or updated events: they keep counting them"
                            );
                        }
                    }
                }
                let to_redis = sinks
                    .iter()
                    .any(|s| s.def.name == insert.sink && s.def.connector.redis().is_some());
                if to_redis && windows.len() > 1 {
                    return Err(plan_error_here(
                        "a redis sink takes one windowed aggregate per query (each key holds one window)".into(),
                    ));
                }
                ctx.state()
                    .optimize(&post)
                    .map_err(|e| plan_error(context.clone(), e))?
            };
            let output_schema = sink_schema(optimized.schema().as_arrow());
            let sink = sinks
                .iter()
                .position(|s| s.def.name == insert.sink)
                .expect("validated: INSERT targets a sink table");
            let time_column = check_sink_columns(
                &sinks[sink].def,
                &sources[driving].def,
                &output_schema,
                !windows.is_empty(),
            )
            .map_err(|message| SqlError::Plan {
                context: context.clone(),
                message,
            })?;
            for index in &dimensions {
                sources[*index].is_dimension = true;
            }
            queries.push(QueryPlan {
                sink,
                driving,
                dimensions: dimensions.into_iter().collect(),
                plan: optimized,
                view,
                windows,
                watermark_delay,
                output_schema,
                time_column,
            });
        }
        Ok(JobPlan {
            ctx,
            sources,
            sinks,
            queries,
            views,
            checks,
            udfs: spec.udfs.clone(),
            physical: PhysicalPlans::default(),
        })
    }

    /// Runs query `query` over `input` (changes of its driving table). Each
    /// dimension in `dimensions` (source index, contents) is set first.
    pub async fn execute(
        &self,
        query: usize,
        input: RecordBatch,
        dimensions: &[(usize, RecordBatch)],
    ) -> DfResult<Vec<RecordBatch>> {
        let query = &self.queries[query];
        let batches = self
            .run(&query.plan, self.input_table(query), input, dimensions)
            .await?;
        batches
            .into_iter()
            .filter(|batch| batch.num_rows() > 0)
            .map(|batch| conform(&batch, &query.output_schema))
            .collect()
    }

    /// Runs the pre-plan of windowed aggregate `window` of `query` over `input`.
    pub async fn execute_pre(
        &self,
        query: usize,
        window: usize,
        input: RecordBatch,
        dimensions: &[(usize, RecordBatch)],
    ) -> DfResult<Vec<RecordBatch>> {
        let query = &self.queries[query];
        self.run(
            &query.windows[window].pre_plan,
            self.input_table(query),
            input,
            dimensions,
        )
        .await
    }

    /// Runs the post-plan of `query` over the rows of one closing window of
    /// aggregate `window` (the other window tables are empty).
    pub async fn execute_post(
        &self,
        query: usize,
        window: usize,
        rows: RecordBatch,
    ) -> DfResult<Vec<RecordBatch>> {
        let query = &self.queries[query];
        for (i, aggregate) in query.windows.iter().enumerate() {
            aggregate.table.set(if i == window {
                vec![rows.clone()]
            } else {
                Vec::new()
            });
        }
        let batches = self.physical.collect(&self.ctx, &query.plan).await?;
        query.windows[window].table.set(Vec::new());
        batches
            .into_iter()
            .filter(|batch| batch.num_rows() > 0)
            .map(|batch| conform(&batch, &query.output_schema))
            .collect()
    }

    pub(crate) async fn run(
        &self,
        plan: &LogicalPlan,
        input_table: &BatchTable,
        input: RecordBatch,
        dimensions: &[(usize, RecordBatch)],
    ) -> DfResult<Vec<RecordBatch>> {
        input_table.set(vec![input]);
        for (index, contents) in dimensions {
            self.sources[*index].provider.set(vec![contents.clone()]);
        }
        let batches = self.physical.collect(&self.ctx, plan).await;
        // Release the input now rather than at the next batch.
        input_table.set(Vec::new());
        batches
    }

    /// The table a query reads its input from: its shared view, or its driving source.
    fn input_table(&self, query: &QueryPlan) -> &BatchTable {
        match query.view {
            Some(v) => &self.views[v].table,
            None => &self.sources[query.driving].provider,
        }
    }

    /// Computes shared view `view` over `input` (changes of its driving table).
    pub async fn execute_view(
        &self,
        view: usize,
        input: RecordBatch,
        dimensions: &[(usize, RecordBatch)],
    ) -> DfResult<RecordBatch> {
        let view = &self.views[view];
        let batches = self
            .run(
                &view.plan,
                &self.sources[view.driving].provider,
                input,
                dimensions,
            )
            .await?;
        let batches = batches
            .iter()
            .map(|b| conform(b, &view.schema))
            .collect::<DfResult<Vec<_>>>()?;
        let rows = arrow::compute::concat_batches(&view.schema, &batches)?;
        // Every query reads the view as a change batch: in position order,
        // which the join may have permuted.
        Ok(crate::change::in_position_order(rows)?)
    }
}

/// The delay of `WATERMARK FOR col AS col - INTERVAL '...'`, in microseconds.
pub fn watermark_delay(column: &str, expression: &str) -> Result<i64, String> {
    let text = expression.trim();
    if text == column {
        return Ok(0);
    }
    let bad = || {
        format!(
            "unsupported watermark `{expression}`: write `WATERMARK FOR {column} AS {column} - INTERVAL '200 milliseconds'` \
             (or just `{column}`)"
        )
    };
    let rest = text.strip_prefix(column).ok_or_else(bad)?.trim_start();
    let rest = rest.strip_prefix('-').ok_or_else(bad)?.trim_start();
    let upper = rest.to_ascii_uppercase();
    if !upper.starts_with("INTERVAL") {
        return Err(bad());
    }
    let quoted = rest["INTERVAL".len()..].trim();
    let inner = quoted
        .strip_prefix('\'')
        .and_then(|q| q.strip_suffix('\''))
        .ok_or_else(bad)?;
    let mut parts = inner.split_whitespace();
    let amount: f64 = parts.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    let unit = parts.next().unwrap_or("seconds").to_ascii_lowercase();
    let micros = match unit.as_str() {
        "us" | "microsecond" | "microseconds" => 1.0,
        "ms" | "millisecond" | "milliseconds" => 1_000.0,
        "s" | "sec" | "second" | "seconds" => 1_000_000.0,
        "min" | "minute" | "minutes" => 60_000_000.0,
        "h" | "hour" | "hours" => 3_600_000_000.0,
        _ => return Err(bad()),
    };
    if parts.next().is_some() || amount < 0.0 {
        return Err(bad());
    }
    Ok((amount * micros) as i64)
}

fn plan_error(context: String, error: DataFusionError) -> SqlError {
    SqlError::Plan {
        context,
        message: error.to_string(),
    }
}

fn source_table(def: &TableDef) -> Result<SourceTable, SqlError> {
    // Every column is nullable in change batches: a delete with the default
    // replica identity carries only the key columns.
    let columns: Vec<Field> = def
        .columns
        .iter()
        .map(|f| f.clone().with_nullable(true))
        .collect();
    let declared = Arc::new(Schema::new(columns.clone()));
    let mut fields = columns;
    for field in metadata_fields() {
        if declared.field_with_name(field.name()).is_ok() {
            return Err(SqlError::Table {
                table: def.name.clone(),
                location: def.location,
                message: format!(
                    "column name `{}` is reserved for change metadata",
                    field.name()
                ),
            });
        }
        fields.push(field);
    }
    let mut primary_key = Vec::new();
    for column in &def.primary_key {
        let index = declared.index_of(column).map_err(|_| SqlError::Table {
            table: def.name.clone(),
            location: def.location,
            message: format!("PRIMARY KEY column `{column}` is not a declared column"),
        })?;
        primary_key.push(index);
    }
    if let Some(watermark) = &def.watermark {
        let field = declared
            .field_with_name(&watermark.column)
            .map_err(|_| SqlError::Table {
                table: def.name.clone(),
                location: def.location,
                message: format!(
                    "WATERMARK column `{}` is not a declared column",
                    watermark.column
                ),
            })?;
        if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
            return Err(SqlError::Table {
                table: def.name.clone(),
                location: def.location,
                message: format!(
                    "WATERMARK column `{}` must be a TIMESTAMP",
                    watermark.column
                ),
            });
        }
    }
    let schema = Arc::new(Schema::new(fields));
    Ok(SourceTable {
        def: def.clone(),
        declared,
        provider: Arc::new(BatchTable::new(schema.clone())),
        schema,
        primary_key,
        is_dimension: false,
    })
}

/// The schema sinks receive: DataFusion may produce Utf8View strings and
/// nanosecond or zone-less timestamps; sinks get Utf8 and UTC microseconds.
fn sink_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|field| {
            let data_type = match field.data_type() {
                DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
                DataType::Timestamp(_, _) => {
                    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
                }
                other => other.clone(),
            };
            Field::new(field.name(), data_type, true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Casts a batch to the promised sink schema.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> DfResult<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                cast(column, field.data_type()).map_err(DataFusionError::from)
            }
        })
        .collect::<DfResult<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Checks a sink's column options against the query output; returns the
/// filesystem sink's time column, if it partitions by time, or the Kafka
/// sink's message timestamp column.
fn check_sink_columns(
    sink: &TableDef,
    driving: &TableDef,
    output: &Schema,
    windowed: bool,
) -> Result<Option<usize>, String> {
    match &sink.connector {
        Connector::Sink(SinkConnector::Filesystem(options)) => {
            let Some(_) = &options.time_pattern else {
                return Ok(None);
            };
            let column = options
                .time_column
                .clone()
                .or_else(|| driving.watermark.as_ref().map(|w| w.column.clone()))
                .ok_or_else(|| {
                    "`partitioning.time_pattern` needs a time column: set `partitioning.time_column` \
                     or declare a WATERMARK on the driving table"
                        .to_string()
                })?;
            let index = output.index_of(&column).map_err(|_| {
                format!("the partition time column `{column}` is not an output column of the query")
            })?;
            if !matches!(output.field(index).data_type(), DataType::Timestamp(_, _)) {
                return Err(format!(
                    "the partition time column `{column}` must be a timestamp"
                ));
            }
            Ok(Some(index))
        }
        Connector::Sink(SinkConnector::Redis(options)) => {
            options.check_columns(output)?;
            Ok(None)
        }
        Connector::Sink(SinkConnector::Kafka(options)) => {
            let watermark = driving.watermark.as_ref().map(|w| w.column.as_str());
            options.check_columns(output, watermark, windowed)
        }
        Connector::Sink(SinkConnector::Webhook(options)) => {
            options.check_columns(output, windowed)?;
            Ok(None)
        }
        Connector::Source(_) | Connector::Sink(SinkConnector::Blackhole) => Ok(None),
    }
}
