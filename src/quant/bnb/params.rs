//! What a bitsandbytes 4-bit weight is stored with: the JSON object transformers saves as
//! `<weight>.quant_state.bitsandbytes__<type>` (the bytes of a `u8` tensor), read as
//! bitsandbytes' `QuantState.from_dict` reads it.

use candle_core::DType;
use serde_json::{Map, Value};

/// A bitsandbytes 4-bit code book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bnb4Type {
    /// QLoRA's NormalFloat 4 (`bnb_4bit_quant_type="nf4"`).
    Nf4,
    /// bitsandbytes' 4-bit float (`"fp4"`, its default).
    Fp4,
}

impl Bnb4Type {
    /// The type's name as bitsandbytes writes it (`"nf4"`, `"fp4"`).
    ///
    /// ```
    /// use lorakit::quant::Bnb4Type;
    /// assert_eq!(Bnb4Type::from_name("nf4"), Some(Bnb4Type::Nf4));
    /// assert_eq!(Bnb4Type::Fp4.name(), "fp4");
    /// assert_eq!(Bnb4Type::from_name("int4"), None);
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Bnb4Type::Nf4 => "nf4",
            Bnb4Type::Fp4 => "fp4",
        }
    }

    /// The type named `name` (`"nf4"`, `"fp4"`), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [Bnb4Type::Nf4, Bnb4Type::Fp4]
            .into_iter()
            .find(|t| t.name() == name)
    }

    /// The 16 values the codes stand for.
    pub(crate) fn code(self) -> &'static [f32; 16] {
        match self {
            Bnb4Type::Nf4 => &super::codes::NF4,
            Bnb4Type::Fp4 => &super::codes::FP4,
        }
    }
}

/// The second level of double quantization (`bnb_4bit_use_double_quant`): the block
/// scales are stored as 8-bit codes, `nested_blocksize` of them sharing an f32 scale, with
/// `nested_offset` added back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NestedParams {
    /// How many block scales share one second-level scale.
    pub blocksize: usize,
    /// The mean taken out of the block scales before they were quantized (f32, as
    /// bitsandbytes rounds the JSON's number).
    pub offset: f32,
}

/// A bitsandbytes 4-bit weight's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bnb4Params {
    /// The code book.
    pub quant_type: Bnb4Type,
    /// How many consecutive values of the flattened weight share one scale.
    pub blocksize: usize,
    /// The dtype bitsandbytes dequantizes to (the model's when it was quantized).
    pub dtype: DType,
    /// The weight's `(d_out, d_in)`.
    pub shape: (usize, usize),
    /// The second level of scales, for double quantization.
    pub nested: Option<NestedParams>,
}

impl Bnb4Params {
    /// Reads the quant state's JSON `bytes`; the reason it is refused otherwise (not JSON,
    /// a missing or mistyped key, an unknown type or dtype, a shape that is not 2-D).
    ///
    /// ```
    /// use candle_core::DType;
    /// use lorakit::quant::{Bnb4Params, Bnb4Type};
    /// let json = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
    ///     "shape": [128, 256], "nested_blocksize": 256, "nested_dtype": "float32",
    ///     "nested_offset": 0.05}"#;
    /// let p = Bnb4Params::parse(json).unwrap();
    /// assert_eq!((p.quant_type, p.blocksize, p.dtype, p.shape), (Bnb4Type::Nf4, 64, DType::BF16, (128, 256)));
    /// assert_eq!(p.nested.unwrap().offset, 0.05f32);
    /// let err = Bnb4Params::parse(br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2, 2]}"#);
    /// assert!(err.unwrap_err().contains("dtype"));
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("its quant state is not JSON ({e})"))?;
        let Value::Object(map) = value else {
            return Err("its quant state is not a JSON object".to_string());
        };
        let quant_type = string(&map, "quant_type")?;
        let quant_type = Bnb4Type::from_name(quant_type)
            .ok_or_else(|| format!("quant_type \"{quant_type}\" is neither nf4 nor fp4"))?;
        let blocksize = positive(&map, "blocksize")?;
        let dtype = float_dtype(string(&map, "dtype")?)?;
        let shape = match map
            .get("shape")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([rows, cols]) => match (rows.as_u64(), cols.as_u64()) {
                (Some(r), Some(c)) if r > 0 && c > 0 => (r as usize, c as usize),
                _ => return Err(format!("shape {rows}, {cols} is not two positive sizes")),
            },
            _ => {
                return Err(format!(
                    "shape {} is not [d_out, d_in]",
                    map.get("shape")
                        .map_or("(missing)".to_string(), Value::to_string)
                ))
            }
        };
        let nested = match map.get("nested_blocksize") {
            None => None,
            Some(_) => {
                let nested_dtype = string(&map, "nested_dtype")?;
                if nested_dtype != "float32" {
                    return Err(format!("nested_dtype \"{nested_dtype}\" is not float32"));
                }
                let offset = map
                    .get("nested_offset")
                    .and_then(Value::as_f64)
                    .filter(|o| o.is_finite())
                    .ok_or("nested_offset is missing or not a finite number")?;
                Some(NestedParams {
                    blocksize: positive(&map, "nested_blocksize")?,
                    offset: offset as f32,
                })
            }
        };
        Ok(Self {
            quant_type,
            blocksize,
            dtype,
            shape,
            nested,
        })
    }

    /// How many values the weight holds.
    pub fn value_count(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    /// How many blocks (scales) the weight has.
    pub fn blocks(&self) -> usize {
        self.value_count().div_ceil(self.blocksize)
    }
}

/// The string at `key`.
fn string<'a>(map: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    map.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{key} is missing or not a string"))
}

/// The positive integer at `key`.
fn positive(map: &Map<String, Value>, key: &str) -> Result<usize, String> {
    map.get(key)
        .and_then(Value::as_u64)
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("{key} is missing or not a positive integer"))
}

/// The float dtype torch names `name`.
fn float_dtype(name: &str) -> Result<DType, String> {
    match name {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::BF16),
        _ => Err(format!(
            "dtype \"{name}\" is not float32, float16 or bfloat16"
        )),
    }
}
