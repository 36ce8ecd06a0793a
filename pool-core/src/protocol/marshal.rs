//! The subset of Python's `marshal` format (version 2) that frame headers need, as a serde data
//! format.
//!
//! `marshal` is the fastest codec a bare Python interpreter has (`marshal.loads`/`dumps` are C,
//! and about four times quicker than `json` for a list of numbers), so a worker without msgpack
//! still gets a binary header codec. Version 2 is the newest version without back-references:
//! every value is one type byte and its data, little-endian:
//!
//! | byte | value | data |
//! |---|---|---|
//! | `N`, `T`, `F` | None, True, False | — |
//! | `i` | int that fits 32 bits | `i32` |
//! | `l` | any other int | `i32` digit count (negative for a negative number), then that many `u16` digits of 15 bits, least significant first |
//! | `g` | float | `f64` |
//! | `u` | str | `u32` byte length, UTF-8 |
//! | `[`, `(` | list, tuple | `u32` item count, the items |
//! | `{` | dict | key, value, key, value, …, then `0` |
//!
//! This side writes only those types (strings as `u`, sequences as `[`) and reads only those
//! (plus `t`, an interned str, which Python writes from version 3 on). Integers beyond 64 bits,
//! byte strings (which travel as attachments), code objects and the rest are refused with an
//! error, as is anything nested deeper than the limit the decoder is given.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, Serialize};

/// What went wrong while encoding or decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

// ---- encoding ----------------------------------------------------------------------------

/// Encodes `value` in marshal version 2.
pub(crate) fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(128);
    value.serialize(&mut Encoder { out: &mut out })?;
    Ok(out)
}

struct Encoder<'a> {
    out: &'a mut Vec<u8>,
}

impl Encoder<'_> {
    fn int(&mut self, v: i128) {
        if let Ok(small) = i32::try_from(v) {
            self.out.push(b'i');
            self.out.extend_from_slice(&small.to_le_bytes());
            return;
        }
        // Base 2^15 digits, least significant first; the count carries the sign.
        let mut magnitude = v.unsigned_abs();
        let mut digits = Vec::with_capacity(9);
        while magnitude > 0 {
            digits.push((magnitude & 0x7fff) as u16);
            magnitude >>= 15;
        }
        // At most 9 digits for a 128-bit value: the count fits any integer type.
        let count = digits.len() as i32;
        self.out.push(b'l');
        self.out
            .extend_from_slice(&(if v < 0 { -count } else { count }).to_le_bytes());
        for digit in digits {
            self.out.extend_from_slice(&digit.to_le_bytes());
        }
    }

    fn len(&mut self, n: usize) -> Result<(), Error> {
        let n = u32::try_from(n).map_err(|_| Error(format!("{n} items are too many")))?;
        self.out.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }

    fn text(&mut self, v: &str) -> Result<(), Error> {
        self.out.push(b'u');
        self.len(v.len())?;
        self.out.extend_from_slice(v.as_bytes());
        Ok(())
    }
}

/// A list being written: its count is patched in once the items are known.
struct ListEncoder<'a, 'b> {
    encoder: &'b mut Encoder<'a>,
    count_at: usize,
    count: usize,
}

impl ListEncoder<'_, '_> {
    fn item<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.count += 1;
        value.serialize(&mut *self.encoder)
    }

    fn finish(self) -> Result<(), Error> {
        let n = u32::try_from(self.count)
            .map_err(|_| Error(format!("{} items are too many", self.count)))?;
        self.encoder.out[self.count_at..self.count_at + 4].copy_from_slice(&n.to_le_bytes());
        Ok(())
    }
}

impl<'a, 'b> ser::Serializer for &'b mut Encoder<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = ListEncoder<'a, 'b>;
    type SerializeTuple = ListEncoder<'a, 'b>;
    type SerializeTupleStruct = ListEncoder<'a, 'b>;
    type SerializeTupleVariant = ser::Impossible<(), Error>;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = ser::Impossible<(), Error>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.out.push(if v { b'T' } else { b'F' });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.int(v.into());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.int(v.into());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        self.serialize_f64(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        self.out.push(b'g');
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.text(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.text(v)
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Error> {
        Err(Error(
            "byte strings travel as attachments, not in the header".into(),
        ))
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.out.push(b'N');
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        self.serialize_none()
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        self.text(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        // As serde_json does: a map of one entry.
        self.out.push(b'{');
        self.text(variant)?;
        value.serialize(&mut *self)?;
        self.out.push(b'0');
        Ok(())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        self.out.push(b'[');
        let count_at = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        Ok(ListEncoder {
            encoder: self,
            count_at,
            count: 0,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(Error(format!("{name}::{variant} has no marshal form")))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, Error> {
        self.out.push(b'{');
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
        self.out.push(b'{');
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(Error(format!("{name}::{variant} has no marshal form")))
    }
}

impl ser::SerializeSeq for ListEncoder<'_, '_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.item(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTuple for ListEncoder<'_, '_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.item(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for ListEncoder<'_, '_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.item(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeMap for &mut Encoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        key.serialize(KeyEncoder { encoder: self })
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        self.out.push(b'0');
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Encoder<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.text(key)?;
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        self.out.push(b'0');
        Ok(())
    }
}

/// Map keys: strings only, as in JSON.
struct KeyEncoder<'a, 'b> {
    encoder: &'b mut Encoder<'a>,
}

impl KeyEncoder<'_, '_> {
    fn refuse(what: &str) -> Error {
        Error(format!("map keys must be strings, not {what}"))
    }
}

impl ser::Serializer for KeyEncoder<'_, '_> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = ser::Impossible<(), Error>;
    type SerializeTuple = ser::Impossible<(), Error>;
    type SerializeTupleStruct = ser::Impossible<(), Error>;
    type SerializeTupleVariant = ser::Impossible<(), Error>;
    type SerializeMap = ser::Impossible<(), Error>;
    type SerializeStruct = ser::Impossible<(), Error>;
    type SerializeStructVariant = ser::Impossible<(), Error>;

    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.encoder.text(v)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        self.encoder.text(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_bool(self, _: bool) -> Result<(), Error> {
        Err(Self::refuse("a bool"))
    }
    fn serialize_i8(self, _: i8) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_i16(self, _: i16) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_i32(self, _: i32) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_i64(self, _: i64) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_u8(self, _: u8) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_u16(self, _: u16) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_u32(self, _: u32) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_u64(self, _: u64) -> Result<(), Error> {
        Err(Self::refuse("an integer"))
    }
    fn serialize_f32(self, _: f32) -> Result<(), Error> {
        Err(Self::refuse("a float"))
    }
    fn serialize_f64(self, _: f64) -> Result<(), Error> {
        Err(Self::refuse("a float"))
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.encoder.text(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Error> {
        Err(Self::refuse("bytes"))
    }
    fn serialize_none(self) -> Result<(), Error> {
        Err(Self::refuse("null"))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        Err(Self::refuse("null"))
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        Err(Self::refuse("null"))
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Error> {
        Err(Self::refuse("an enum"))
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(Self::refuse("a list"))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Error> {
        Err(Self::refuse("a list"))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Error> {
        Err(Self::refuse("a list"))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(Self::refuse("an enum"))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(Self::refuse("a map"))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Error> {
        Err(Self::refuse("a map"))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(Self::refuse("an enum"))
    }
}

// ---- decoding ----------------------------------------------------------------------------

/// Decodes a `T` from marshal bytes, refusing values nested deeper than `max_depth` and any
/// bytes left over.
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(
    input: &'de [u8],
    max_depth: usize,
) -> Result<T, Error> {
    let mut decoder = Decoder {
        input,
        depth_left: max_depth,
    };
    let value = T::deserialize(&mut decoder)?;
    if !decoder.input.is_empty() {
        return Err(Error(format!(
            "{} bytes after the value",
            decoder.input.len()
        )));
    }
    Ok(value)
}

/// Hands the value in `input` to `visitor` as a map (for readers that stop part way through).
pub(crate) fn deserialize_map<'de, V: Visitor<'de>>(
    input: &'de [u8],
    max_depth: usize,
    visitor: V,
) -> Result<V::Value, Error> {
    let mut decoder = Decoder {
        input,
        depth_left: max_depth,
    };
    de::Deserializer::deserialize_map(&mut decoder, visitor)
}

struct Decoder<'de> {
    input: &'de [u8],
    depth_left: usize,
}

impl<'de> Decoder<'de> {
    fn take(&mut self, n: usize) -> Result<&'de [u8], Error> {
        if self.input.len() < n {
            return Err(Error("the value ends early".into()));
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn peek(&self) -> Result<u8, Error> {
        self.input
            .first()
            .copied()
            .ok_or_else(|| Error("the value ends early".into()))
    }

    fn i32(&mut self) -> Result<i32, Error> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length or count: a non-negative `i32`, bounded by the bytes left (every item takes at
    /// least one), so a hostile count cannot make anything allocate more than the input.
    fn count(&mut self) -> Result<usize, Error> {
        let n = self.i32()?;
        let n = usize::try_from(n).map_err(|_| Error(format!("negative length {n}")))?;
        if n > self.input.len() {
            return Err(Error(format!(
                "length {n} exceeds the {} bytes left",
                self.input.len()
            )));
        }
        Ok(n)
    }

    fn text(&mut self) -> Result<&'de str, Error> {
        let n = self.count()?;
        std::str::from_utf8(self.take(n)?).map_err(|e| Error(format!("a str is not UTF-8: {e}")))
    }

    /// An `l` integer, which must fit 64 bits (as JSON integers do here).
    fn long(&mut self) -> Result<i128, Error> {
        let count = self.i32()?;
        let digits = count.unsigned_abs() as usize;
        if digits > 5 {
            // Five 15-bit digits hold 75 bits; a canonical long beyond 64 bits needs at least
            // five, and anything longer is beyond 64 bits for sure.
            self.take(digits.saturating_mul(2))?;
            return Err(Error(
                "an integer does not fit in 64 bits; send it as a string".into(),
            ));
        }
        let mut magnitude: i128 = 0;
        let raw = self.take(digits * 2)?;
        for (i, pair) in raw.chunks_exact(2).enumerate() {
            let digit = u16::from_le_bytes([pair[0], pair[1]]);
            if digit > 0x7fff {
                return Err(Error(format!("bad long digit {digit}")));
            }
            magnitude |= i128::from(digit) << (15 * i);
        }
        let value = if count < 0 { -magnitude } else { magnitude };
        if value > i128::from(u64::MAX) || value < i128::from(i64::MIN) {
            return Err(Error(
                "an integer does not fit in 64 bits; send it as a string".into(),
            ));
        }
        Ok(value)
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error> {
        if self.depth_left == 0 {
            return Err(Error("values nest too deep".into()));
        }
        self.depth_left -= 1;
        let out = f(self);
        self.depth_left += 1;
        out
    }
}

fn unknown_type(byte: u8) -> Error {
    if byte.is_ascii_graphic() {
        Error(format!(
            "marshal type '{}' is not one a header may hold",
            byte as char
        ))
    } else {
        Error(format!(
            "marshal type byte 0x{byte:02x} is not one a header may hold"
        ))
    }
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.byte()? {
            b'N' => visitor.visit_unit(),
            b'T' => visitor.visit_bool(true),
            b'F' => visitor.visit_bool(false),
            b'i' => visitor.visit_i64(self.i32()?.into()),
            b'l' => {
                let v = self.long()?;
                match i64::try_from(v) {
                    Ok(v) => visitor.visit_i64(v),
                    // long() keeps values within u64::MAX.
                    Err(_) => visitor.visit_u64(v as u64),
                }
            }
            b'g' => {
                let b = self.take(8)?;
                let mut raw = [0; 8];
                raw.copy_from_slice(b);
                visitor.visit_f64(f64::from_le_bytes(raw))
            }
            b'u' | b't' => visitor.visit_borrowed_str(self.text()?),
            b'[' | b'(' => {
                let n = self.count()?;
                self.nested(|d| {
                    visitor.visit_seq(Items {
                        decoder: d,
                        left: n,
                    })
                })
            }
            b'{' => self.nested(|d| {
                let value = visitor.visit_map(Entries { decoder: d })?;
                Ok(value)
            }),
            other => Err(unknown_type(other)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.peek()? == b'N' {
            self.input = &self.input[1..];
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.byte()? {
            b'u' | b't' => visitor.visit_enum(self.text()?.into_deserializer()),
            other => Err(Error(format!(
                "expected a variant name (a str), found type {:?}",
                other as char
            ))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

struct Items<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
    left: usize,
}

impl<'de> SeqAccess<'de> for Items<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

struct Entries<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
}

impl<'de> MapAccess<'de> for Entries<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.decoder.peek()? {
            b'0' => {
                self.decoder.input = &self.decoder.input[1..];
                Ok(None)
            }
            b'u' | b't' => seed.deserialize(&mut *self.decoder).map(Some),
            other => Err(Error(format!(
                "map keys must be strings, found marshal type {:?}",
                other as char
            ))),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(&mut *self.decoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn roundtrip(value: &Value) -> Value {
        let bytes = to_vec(value).expect("encodes");
        from_slice(&bytes, 128).expect("decodes")
    }

    #[test]
    fn plain_values_round_trip() {
        for value in [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(-1),
            json!(i32::MAX),
            json!(i32::MIN),
            json!(i64::from(i32::MAX) + 1),
            json!(i64::MIN),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1.25),
            json!(-0.0),
            json!(""),
            json!("héllo ✓"),
            json!([]),
            json!({}),
            json!({"a": [1, {"b": null}], "c": "d"}),
        ] {
            assert_eq!(roundtrip(&value), value, "{value}");
        }
    }

    /// Bytes Python's `marshal.dumps(..., 2)` writes for these values.
    #[test]
    fn matches_python_marshal_version_2() {
        let cases: [(Value, &[u8]); 5] = [
            (json!(5), b"i\x05\x00\x00\x00"),
            (json!(-1), b"i\xff\xff\xff\xff"),
            // 2**40 and -2**40
            (
                json!(1u64 << 40),
                b"l\x03\x00\x00\x00\x00\x00\x00\x00\x00\x04",
            ),
            (
                json!(-(1i64 << 40)),
                b"l\xfd\xff\xff\xff\x00\x00\x00\x00\x00\x04",
            ),
            (
                json!({"ok": [true, null, "x"]}),
                b"{u\x02\x00\x00\x00ok[\x03\x00\x00\x00TNu\x01\x00\x00\x00x0",
            ),
        ];
        for (value, bytes) in cases {
            assert_eq!(to_vec(&value).unwrap(), bytes, "{value}");
            assert_eq!(from_slice::<Value>(bytes, 128).unwrap(), value);
        }
        // A tuple reads as a list; an interned str (version 3+) as a str.
        assert_eq!(
            from_slice::<Value>(b"(\x01\x00\x00\x00t\x01\x00\x00\x00a", 128).unwrap(),
            json!(["a"])
        );
    }

    #[test]
    fn refuses_what_a_header_may_not_hold() {
        let bad: [&[u8]; 9] = [
            b"",                                                                  // nothing
            b"i\x01\x00",                                                         // short int
            b"u\x05\x00\x00\x00ab",                                               // short str
            b"u\x02\x00\x00\x00\xff\xfe",                                         // not UTF-8
            b"[\xff\xff\xff\x7f",    // a count beyond the input
            b"s\x01\x00\x00\x00a",   // inline bytes
            b"c",                    // a code object
            b"{i\x01\x00\x00\x00N0", // an int key
            b"l\x06\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00", // > 64 bits
        ];
        for input in bad {
            assert!(from_slice::<Value>(input, 128).is_err(), "{input:?}");
        }
        // 2**64 in five digits: beyond u64 too.
        assert!(from_slice::<Value>(
            b"l\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00",
            128
        )
        .is_err());
        assert!(from_slice::<Value>(b"NN", 128).is_err(), "trailing bytes");
    }

    /// Random values of every shape a header holds come back equal.
    #[test]
    fn random_values_round_trip() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        fn value(next: &mut dyn FnMut() -> u64, depth: u32) -> Value {
            let scalar_only = depth >= 4;
            match next() % if scalar_only { 7 } else { 9 } {
                0 => Value::Null,
                1 => Value::Bool(next() % 2 == 0),
                // Around every width boundary: 32-bit, the 15-bit digits, 63 and 64 bits.
                2 => {
                    let bits = next() % 64;
                    let v = (next() >> (63 - bits.min(62))) as i64;
                    json!(if next() % 2 == 0 { v } else { v.wrapping_neg() })
                }
                3 => json!(next()),
                4 => json!(
                    f64::from_bits(next() % (0x7fefu64 << 48))
                        * if next() % 2 == 0 { 1.0 } else { -1.0 }
                ),
                5 => json!((0..next() % 12)
                    .map(|_| char::from_u32((next() % 0x2fff) as u32).unwrap_or('?'))
                    .collect::<String>()),
                6 => json!(""),
                7 => Value::Array((0..next() % 6).map(|_| value(next, depth + 1)).collect()),
                _ => Value::Object(
                    (0..next() % 6)
                        .map(|i| (format!("k{i}"), value(next, depth + 1)))
                        .collect(),
                ),
            }
        }
        for _ in 0..5_000 {
            let v = value(&mut next, 0);
            assert_eq!(roundtrip(&v), v, "{v}");
        }
    }

    /// Damaged and random input is refused (or read) without a panic, and never allocates more
    /// than the input holds.
    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        let valid = to_vec(&json!({"type": "result", "id": 7, "ok": [1, -2, 1u64 << 40,
            "text", {"k": [null, true, 2.5]}]}))
        .unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut input = valid.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % input.len() as u64) as usize;
                input[at] = next() as u8;
            }
            input.truncate((next() % (input.len() as u64 + 1)) as usize);
            let _ = from_slice::<Value>(&input, 128);
            let random: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let _ = from_slice::<Value>(&random, 128);
        }
    }

    #[test]
    fn depth_is_bounded() {
        let mut deep = Vec::new();
        for _ in 0..200 {
            deep.extend_from_slice(b"[\x01\x00\x00\x00");
        }
        deep.push(b'N');
        assert!(from_slice::<Value>(&deep, 128).is_err());
        assert!(from_slice::<Value>(&deep, 250).is_ok());
    }
}
