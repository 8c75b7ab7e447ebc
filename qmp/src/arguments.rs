//! Typed command arguments: deserialises a command's `arguments` object into a serde type
//! and reports mistakes with QEMU's texts, naming the offending member by its full path
//! (`opts.size`, `enable[0]`), as QEMU's QAPI input visitor does:
//!
//! - "Parameter 'x' is missing"
//! - "Parameter 'x' is unexpected" (argument structs must use `#[serde(deny_unknown_fields)]`)
//! - `Invalid parameter type for 'x', expected: <type>`, the type being one of `string`,
//!   `boolean`, `integer`, `number`, `array`, `object`
//! - `Parameter 'x' expects <C type>` (`uint8_t`, `int32_t`...) for integers outside the
//!   target type's range
//! - "Parameter 'x' does not accept value 'v'" for unknown enumeration values
//!
//! All of them are `GenericError`.

use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};
use serde_json::{Map, Value};

use crate::error::QmpError;

/// Deserialises `arguments` (absent means `{}`) into `T`.
pub fn from_arguments<T: DeserializeOwned>(
    arguments: Option<Map<String, Value>>,
) -> Result<T, QmpError> {
    let value = Value::Object(arguments.unwrap_or_default());
    T::deserialize(ArgDeserializer {
        value,
        path: String::new(),
    })
    .map_err(ArgError::into_qmp)
}

/// A deserialisation error, before it is turned into QEMU's text.
#[derive(Debug, Clone)]
enum ArgError {
    /// Member missing; `qualified` once the enclosing struct's path was prepended.
    Missing { name: String, qualified: bool },
    /// Member not expected by the target struct.
    Unexpected { name: String, qualified: bool },
    /// Value of the wrong JSON type.
    InvalidType { name: String, expected: String },
    /// Integer outside the target type's range.
    OutOfRange { name: String, expects: &'static str },
    /// Enumeration value not in the enumeration; the name is filled in by the enum's owner.
    UnknownVariant { name: Option<String>, value: String },
    /// Anything else, e.g. a custom validation message from a `Deserialize` impl.
    Custom(String),
}

impl ArgError {
    fn into_qmp(self) -> QmpError {
        match self {
            ArgError::Missing { name, .. } => QmpError::missing_parameter(&name),
            ArgError::Unexpected { name, .. } => QmpError::unexpected_parameter(&name),
            ArgError::InvalidType { name, expected } => {
                QmpError::invalid_parameter_type(&name, &expected)
            }
            ArgError::OutOfRange { name, expects } => {
                QmpError::invalid_parameter_value(&name, expects)
            }
            ArgError::UnknownVariant { name, value } => {
                QmpError::unaccepted_value(name.as_deref().unwrap_or("null"), &value)
            }
            ArgError::Custom(msg) => QmpError::generic(msg),
        }
    }

    /// Prefixes member names reported by a struct's visitor with the struct's own path.
    fn within_struct(self, path: &str) -> Self {
        let join = |name: String| {
            if path.is_empty() {
                name
            } else {
                format!("{path}.{name}")
            }
        };
        match self {
            ArgError::Missing {
                name,
                qualified: false,
            } => ArgError::Missing {
                name: join(name),
                qualified: true,
            },
            ArgError::Unexpected {
                name,
                qualified: false,
            } => ArgError::Unexpected {
                name: join(name),
                qualified: true,
            },
            other => other,
        }
    }

    /// Names the enumeration member whose value was not accepted.
    fn within_enum(self, path: &str) -> Self {
        match self {
            ArgError::UnknownVariant { name: None, value } => ArgError::UnknownVariant {
                name: Some(path.to_owned()),
                value,
            },
            other => other,
        }
    }
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.clone().into_qmp().desc)
    }
}

impl std::error::Error for ArgError {}

impl de::Error for ArgError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ArgError::Custom(msg.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        ArgError::Missing {
            name: field.to_owned(),
            qualified: false,
        }
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        ArgError::Unexpected {
            name: field.to_owned(),
            qualified: false,
        }
    }

    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        ArgError::UnknownVariant {
            name: None,
            value: variant.to_owned(),
        }
    }
}

/// Deserialises one JSON value that sits at `path` within the arguments.
struct ArgDeserializer {
    value: Value,
    path: String,
}

impl ArgDeserializer {
    fn invalid_type(&self, expected: &str) -> ArgError {
        ArgError::InvalidType {
            name: self.display_path(),
            expected: expected.to_owned(),
        }
    }

    /// QEMU names the arguments object itself "null".
    fn display_path(&self) -> String {
        if self.path.is_empty() {
            "null".to_owned()
        } else {
            self.path.clone()
        }
    }

    fn integer<T: TryFrom<i128>>(&self, expects: &'static str) -> Result<T, ArgError> {
        let n = match &self.value {
            Value::Number(n) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from)),
            _ => return Err(self.invalid_type("integer")),
        };
        // A fractional or huge number is a number, but not an integer.
        let n = n.ok_or_else(|| self.invalid_type("integer"))?;
        T::try_from(n).map_err(|_| ArgError::OutOfRange {
            name: self.display_path(),
            expects,
        })
    }
}

macro_rules! deserialize_integer {
    ($method:ident, $visit:ident, $ty:ty, $name:literal) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
            let n: $ty = self.integer($name)?;
            visitor.$visit(n)
        }
    };
}

impl<'de> de::Deserializer<'de> for ArgDeserializer {
    type Error = ArgError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(ref n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => visitor.visit_seq(Elements::new(items, self.path)),
            Value::Object(members) => {
                let path = self.path.clone();
                visitor
                    .visit_map(Members::new(members, self.path))
                    .map_err(|e| e.within_struct(&path))
            }
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Bool(b) => visitor.visit_bool(b),
            _ => Err(self.invalid_type("boolean")),
        }
    }

    deserialize_integer!(deserialize_i8, visit_i8, i8, "int8_t");
    deserialize_integer!(deserialize_i16, visit_i16, i16, "int16_t");
    deserialize_integer!(deserialize_i32, visit_i32, i32, "int32_t");
    deserialize_integer!(deserialize_i64, visit_i64, i64, "int64_t");
    deserialize_integer!(deserialize_u8, visit_u8, u8, "uint8_t");
    deserialize_integer!(deserialize_u16, visit_u16, u16, "uint16_t");
    deserialize_integer!(deserialize_u32, visit_u32, u32, "uint32_t");
    deserialize_integer!(deserialize_u64, visit_u64, u64, "uint64_t");

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value.as_f64() {
            Some(x) => visitor.visit_f64(x),
            None => Err(self.invalid_type("number")),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::String(s) => visitor.visit_string(s),
            _ => Err(self.invalid_type("string")),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            _ => Err(self.invalid_type("null")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Array(items) => visitor.visit_seq(Elements::new(items, self.path)),
            _ => Err(self.invalid_type("array")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Object(members) => {
                let path = self.path.clone();
                visitor
                    .visit_map(Members::new(members, self.path))
                    .map_err(|e| e.within_struct(&path))
            }
            _ => Err(self.invalid_type("object")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        let path = self.display_path();
        match self.value {
            Value::String(s) => visitor
                .visit_enum(UnitVariant(s))
                .map_err(|e| e.within_enum(&path)),
            _ => Err(ArgError::InvalidType {
                name: path,
                expected: "string".to_owned(),
            }),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        visitor.visit_unit()
    }
}

/// Elements of an array, each named `path[i]`.
struct Elements {
    items: std::vec::IntoIter<Value>,
    path: String,
    index: usize,
}

impl Elements {
    fn new(items: Vec<Value>, path: String) -> Self {
        Elements {
            items: items.into_iter(),
            path,
            index: 0,
        }
    }
}

impl<'de> SeqAccess<'de> for Elements {
    type Error = ArgError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ArgError> {
        let Some(value) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        seed.deserialize(ArgDeserializer { value, path }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// Members of an object, each named `path.key` (or `key` at the top).
struct Members {
    members: serde_json::map::IntoIter,
    path: String,
    pending: Option<(String, Value)>,
}

impl Members {
    fn new(members: Map<String, Value>, path: String) -> Self {
        Members {
            members: members.into_iter(),
            path,
            pending: None,
        }
    }
}

impl<'de> MapAccess<'de> for Members {
    type Error = ArgError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ArgError> {
        let Some((key, value)) = self.members.next() else {
            return Ok(None);
        };
        let k = seed.deserialize(key.clone().into_deserializer())?;
        self.pending = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ArgError> {
        let (key, value) = self
            .pending
            .take()
            .ok_or_else(|| ArgError::Custom("object value requested before its key".into()))?;
        let path = if self.path.is_empty() {
            key
        } else {
            format!("{}.{key}", self.path)
        };
        seed.deserialize(ArgDeserializer { value, path })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.members.len())
    }
}

/// An enumeration value given as a string: only unit variants exist in QMP enumerations.
struct UnitVariant(String);

impl<'de> EnumAccess<'de> for UnitVariant {
    type Error = ArgError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), ArgError> {
        let variant = seed.deserialize(self.0.clone().into_deserializer())?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for UnitVariant {
    type Error = ArgError;

    fn unit_variant(self) -> Result<(), ArgError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, ArgError> {
        Err(ArgError::UnknownVariant {
            name: None,
            value: self.0,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, ArgError> {
        Err(ArgError::UnknownVariant {
            name: None,
            value: self.0,
        })
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ArgError> {
        Err(ArgError::UnknownVariant {
            name: None,
            value: self.0,
        })
    }
}
