//! The table every `postgres-cdc` source is in the job's DataFusion session:
//! its contents are the change batch (or dimension) the engine sets right
//! before a query runs.

use std::sync::{Arc, RwLock};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

/// A table whose contents are set by the engine before each query runs.
#[derive(Debug)]
pub struct BatchTable {
    schema: SchemaRef,
    batches: RwLock<Vec<RecordBatch>>,
}

impl BatchTable {
    pub fn new(schema: SchemaRef) -> Self {
        BatchTable {
            schema,
            batches: RwLock::new(Vec::new()),
        }
    }

    /// Replaces the contents seen by the next physical plan.
    pub fn set(&self, batches: Vec<RecordBatch>) {
        *self.batches.write().expect("batch table lock poisoned") = batches;
    }
}

#[async_trait]
impl TableProvider for BatchTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = self
            .batches
            .read()
            .expect("batch table lock poisoned")
            .clone();
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}
