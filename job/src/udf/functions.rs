//! Loaded UDFs as DataFusion functions: a scalar UDF as a `ScalarUDFImpl`, a
//! UDAF as an `AggregateUDFImpl` (whose accumulator gathers the group's
//! values and calls the plugin once, at evaluation). In windows the engine
//! does not use that accumulator: it recognises the aggregate
//! ([`PluginFunction::udf_of`]) and keeps the values in its window state.

use std::any::Any;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ListArray};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{exec_err, plan_err, Result, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};

use super::ffi::CallError;
use super::{Udf, UdfPanicked, UdfRef};

/// Registers every UDF of `udfs` with `ctx`.
pub fn register(ctx: &datafusion::prelude::SessionContext, udfs: &[Arc<Udf>]) {
    for udf in udfs {
        if udf.signature.is_aggregate() {
            ctx.register_udaf(AggregateUDF::new_from_impl(PluginFunction::new(
                udf.clone(),
            )));
        } else {
            ctx.register_udf(ScalarUDF::new_from_impl(PluginFunction::new(udf.clone())));
        }
    }
}

/// The declared argument types, if `given` converts to them implicitly (as
/// DataFusion coerces arguments of its own functions); otherwise a plan error
/// that says what the function takes and which library it comes from.
fn coerce(udf: &Udf, given: &[DataType]) -> Result<Vec<DataType>> {
    let declared: Vec<DataType> = (0..udf.signature.args.len())
        .map(|i| udf.signature.arg_field(i).data_type().clone())
        .collect();
    let fits = given.len() == declared.len()
        && given
            .iter()
            .zip(&declared)
            .all(|(from, to)| implicit(from, to));
    if fits {
        return Ok(declared);
    }
    let takes: Vec<&str> = udf
        .signature
        .args
        .iter()
        .map(|a| a.data_type.sql())
        .collect();
    let called: Vec<String> = given.iter().map(|t| t.to_string()).collect();
    plan_err!(
        "UDF `{}` takes ({}) but is called with ({}); it is declared in {} (built as {}): \
         cast the arguments, or change its #[udf] signature and rebuild",
        udf.name(),
        takes.join(", "),
        called.join(", "),
        udf.crate_dir,
        udf.library_path.display()
    )
}

fn call_error(udf: &Udf, error: CallError) -> DataFusionError {
    match error {
        CallError::Panicked => DataFusionError::External(Box::new(UdfPanicked {
            udf: udf.name().to_string(),
        })),
        CallError::Arrow(e) => DataFusionError::ArrowError(Box::new(e), None),
    }
}

/// Whether a `from` argument converts to a declared `to` without saying so:
/// NULL, text to text, bytes to bytes, and numbers that lose nothing
/// (integers widening, any number to a float), as in Postgres.
fn implicit(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let signed = |t: &DataType| matches!(t, Int8 | Int16 | Int32 | Int64);
    let width = |t: &DataType| t.primitive_width().unwrap_or(usize::MAX);
    from == to
        || from.is_null()
        || (matches!(from, Utf8 | LargeUtf8 | Utf8View) && matches!(to, Utf8))
        || (matches!(from, Binary | LargeBinary | BinaryView) && matches!(to, Binary))
        || (to.is_floating() && from.is_numeric())
        || (from.is_integer()
            && to.is_integer()
            && match (signed(from), signed(to)) {
                (true, true) | (false, false) => width(from) <= width(to),
                (false, true) => width(from) < width(to),
                (true, false) => false,
            })
}

/// A plugin UDF as DataFusion sees it: registered as a scalar function, or,
/// for a UDAF, as an aggregate (one type serves both).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PluginFunction {
    udf: UdfRef,
    signature: Signature,
}

impl PluginFunction {
    pub fn new(udf: Arc<Udf>) -> PluginFunction {
        PluginFunction {
            udf: UdfRef(udf),
            // Arguments are checked by `coerce` (for errors that name the
            // library); deterministic functions: DataFusion may fold calls
            // on constants.
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }

    /// The plugin UDAF behind an aggregate function, if it is one.
    pub fn udf_of(function: &AggregateUDF) -> Option<Arc<Udf>> {
        let inner: &dyn Any = function.inner().as_ref();
        inner
            .downcast_ref::<PluginFunction>()
            .map(|p| p.udf.0.clone())
    }
}

impl ScalarUDFImpl for PluginFunction {
    fn name(&self) -> &str {
        self.udf.0.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        coerce(&self.udf.0, arg_types)
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.udf.0.signature.ret.data_type.to_arrow())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        // All constants (e.g. folded at plan time): one call, one value.
        let constant = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let rows = arrays.first().map_or(0, |a| a.len());
        if rows == 0 {
            let ret = self.udf.0.signature.ret.data_type.to_arrow();
            return Ok(ColumnarValue::Array(arrow::array::new_empty_array(&ret)));
        }
        let out = self
            .udf
            .0
            .call(&arrays)
            .map_err(|e| call_error(&self.udf.0, e))?;
        if out.len() != rows {
            return exec_err!(
                "UDF `{}` returned {} rows for {rows}",
                self.udf.0.name(),
                out.len()
            );
        }
        if constant {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?));
        }
        Ok(ColumnarValue::Array(out))
    }
}

impl AggregateUDFImpl for PluginFunction {
    fn name(&self) -> &str {
        self.udf.0.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        coerce(&self.udf.0, arg_types)
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.udf.0.signature.ret.data_type.to_arrow())
    }

    fn accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Gathered {
            udf: self.udf.0.clone(),
            values: Vec::new(),
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let item =
            Field::new_list_field(self.udf.0.signature.arg_field(0).data_type().clone(), true);
        Ok(vec![Arc::new(Field::new(
            format!("{}[values]", args.name),
            DataType::List(Arc::new(item)),
            true,
        ))])
    }
}

/// Every value of a group, for one call at the end.
#[derive(Debug)]
struct Gathered {
    udf: Arc<Udf>,
    values: Vec<ArrayRef>,
}

impl Gathered {
    fn all(&self) -> Result<ArrayRef> {
        let data_type = self.udf.signature.arg_field(0).data_type().clone();
        if self.values.is_empty() {
            return Ok(arrow::array::new_empty_array(&data_type));
        }
        let parts: Vec<&dyn Array> = self.values.iter().map(|a| a.as_ref()).collect();
        Ok(arrow::compute::concat(&parts)?)
    }
}

impl Accumulator for Gathered {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let data_type = self.udf.signature.arg_field(0).data_type().clone();
        self.values
            .push(super::ffi::cast_to(&values[0], &data_type)?);
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let out = call_aggregate(&self.udf, self.all()?)?;
        ScalarValue::try_from_array(&out, 0)
    }

    fn size(&self) -> usize {
        self.values
            .iter()
            .map(|a| a.get_array_memory_size())
            .sum::<usize>()
            + std::mem::size_of::<Self>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let all = self.all()?;
        let list = ListArray::new(
            Arc::new(Field::new_list_field(all.data_type().clone(), true)),
            arrow::buffer::OffsetBuffer::from_lengths([all.len()]),
            all,
            None,
        );
        Ok(vec![ScalarValue::List(Arc::new(list))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists = states[0]
            .as_any()
            .downcast_ref::<ListArray>()
            .ok_or_else(|| DataFusionError::Internal("UDAF state is not a list".into()))?;
        for i in 0..lists.len() {
            if lists.is_valid(i) {
                self.values.push(lists.value(i));
            }
        }
        Ok(())
    }
}

/// Calls a UDAF over one group's values: a one-row result.
pub fn call_aggregate(udf: &Udf, values: ArrayRef) -> Result<ArrayRef> {
    let out = udf.call(&[values]).map_err(|e| call_error(udf, e))?;
    if out.len() != 1 {
        return exec_err!(
            "UDAF `{}` returned {} rows for one group",
            udf.name(),
            out.len()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_conversions_lose_nothing() {
        use DataType::*;
        assert!(implicit(&Utf8View, &Utf8));
        assert!(implicit(&Null, &Int64));
        assert!(implicit(&Int32, &Int64));
        assert!(implicit(&UInt32, &Int64));
        assert!(implicit(&Int64, &Float64));
        assert!(implicit(&Decimal128(10, 2), &Float64));
        assert!(!implicit(&Int64, &Int32));
        assert!(!implicit(&Int32, &UInt64));
        assert!(!implicit(&Float64, &Int64));
        assert!(!implicit(&Int64, &Utf8));
        assert!(!implicit(&Utf8, &Float64));
    }
}
