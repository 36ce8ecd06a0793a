//! Frame body encode + decode for a typical CALL and RESULT, in both codecs, next to plain
//! `serde_json` of the same header map (the floor any JSON header costs).
//! Run: `cargo bench -p pool-core --bench codec`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use pool_core::protocol::{decode, encode, Codec, Message};
use serde_json::json;

fn call() -> Message {
    Message::Call {
        id: 12345,
        command: "predict".into(),
        args: json!({"features": [1.5, 2.5, 3.5, 4.5], "model": "small", "top_k": 3}),
        session: Some("user-7".into()),
        timeout_ms: Some(30_000),
        window: Some(16),
        batch: false,
        scalars: false,
    }
}

fn codec(c: &mut Criterion) {
    let msg = call();
    let attachments = [Bytes::from_static(b"0123456789abcdef")];
    let mut group = c.benchmark_group("codec_call_roundtrip");
    for codec in [Codec::Json, Codec::Msgpack, Codec::Marshal] {
        group.bench_function(codec.name(), |b| {
            b.iter(|| {
                let body = encode(&msg, codec, &attachments).expect("encode");
                decode(body).expect("decode")
            })
        });
    }
    let header = serde_json::to_value(&msg).expect("value");
    group.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(&header).expect("encode");
            serde_json::from_slice::<serde_json::Value>(&bytes).expect("decode")
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
