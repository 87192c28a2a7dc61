//! The proxy's per-request HTTP work: parse the guest's head and rewrite it for upstream, parse the
//! upstream's response head, and frame a chunked body. Buffers are reused across iterations, as the
//! proxy reuses them across requests.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metaproxy::http::{
    parse_request, parse_response, rewrite_proxy_request, ChunkProgress, ChunkedScanner, Limits,
};

const CLOUD_INIT_GET: &[u8] = b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\r\n";

const JSON_200: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1784\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: metaproxy\r\n\r\n";

fn request(c: &mut Criterion) {
    let limits = Limits::default();
    let mut out = Vec::with_capacity(1024);
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(CLOUD_INIT_GET.len() as u64));
    g.bench_function("parse_request+rewrite_proxy_request/cloud-init", |b| {
        b.iter(|| {
            let buf = black_box(CLOUD_INIT_GET);
            let head = parse_request(buf, &limits).unwrap().unwrap();
            out.clear();
            rewrite_proxy_request(
                buf,
                &head,
                "10.0.0.5".parse().unwrap(),
                b"X-Neutron-Router-ID",
                b"3f1c6a7e-9c1b-4f0e-8a43-0d2d1a6f1b2c",
                &mut out,
            );
            black_box(out.len())
        })
    });
    g.finish();
}

fn response(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("response");
    g.throughput(Throughput::Bytes(JSON_200.len() as u64));
    g.bench_function("parse_response/200-json", |b| {
        b.iter(|| {
            let head = parse_response(black_box(JSON_200), &limits, false)
                .unwrap()
                .unwrap();
            black_box(head.body)
        })
    });
    g.finish();
}

fn chunked(c: &mut Criterion) {
    // 4 KiB of payload in 512-byte chunks, as a chunked POST of user data might arrive.
    let mut body = Vec::new();
    for i in 0..8u8 {
        body.extend_from_slice(b"200\r\n");
        body.extend(std::iter::repeat_n(b'a' + i, 512));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut g = c.benchmark_group("chunked");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("scan/4KiB", |b| {
        b.iter(|| {
            let mut s = ChunkedScanner::default();
            match s.scan(black_box(&body)).unwrap() {
                ChunkProgress::Done { consumed } => consumed,
                ChunkProgress::NeedMore { .. } => unreachable!(),
            }
        })
    });
    let mut out = Vec::with_capacity(4096);
    g.bench_function("decode/4KiB", |b| {
        b.iter(|| {
            out.clear();
            let mut s = ChunkedScanner::default();
            black_box(s.decode(black_box(&body), &mut out).unwrap());
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, request, response, chunked);
criterion_main!(benches);
