//! Any `:authority` is accepted on the unix socket. gRPC clients make one up for a unix socket
//! path: grpc-core (Python, C++, Ruby) sends the percent-encoded path (`tmp%2Fcsi.sock`), Java
//! the raw path. h2, under tonic, parses `:authority` as a URI authority and resets the stream
//! (PROTOCOL_ERROR, "Stream removed" on the client) when it is not one, before any of our code
//! runs, and it has no option to relax that. Nothing here uses the authority (one socket, one
//! service), so each connection is relayed through [`relay`], which rewrites an unparsable
//! `:authority` in the client's header blocks to one of the same length that parses
//! (`tmp-2Fcsi.sock`) and passes every other byte through unchanged.
//!
//! HTTP/2 header blocks are HPACK-compressed against a dynamic table that the client's encoder
//! and the server's decoder keep in step. The relay decodes every block to follow that table,
//! and the replacement has the decoded length of the original, so the entry the server stores
//! has the same size as the one the client stored: both tables evict alike and every later
//! index still means the same header. Anything the relay cannot follow (a malformed block, a
//! block over [`MAX_BLOCK`]) makes it stop rewriting and pass the rest of the connection through
//! as is, leaving the verdict to h2.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's minimum).
const MIN_MAX_FRAME: usize = 16_384;
/// Largest header block the relay follows (h2's own header-list limit is smaller).
pub const MAX_BLOCK: usize = 1 << 20;
/// The dynamic table size an HTTP/2 decoder starts with (SETTINGS_HEADER_TABLE_SIZE default).
const INITIAL_TABLE: usize = 4096;

/// Copies the client's bytes `from_client` to `to_server`, rewriting unparsable `:authority`
/// values, until the client closes; then shuts `to_server` down.
pub async fn relay<R, W>(mut from_client: R, mut to_server: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    let n = read_full(&mut from_client, &mut preface).await?;
    to_server.write_all(&preface[..n]).await?;
    if n < preface.len() || &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: nothing to rewrite.
        tokio::io::copy(&mut from_client, &mut to_server).await?;
        return to_server.shutdown().await;
    }
    let mut table = Table::new();
    let mut pending: Option<Pending> = None;
    loop {
        let mut head = [0u8; 9];
        let n = read_full(&mut from_client, &mut head).await?;
        if n < head.len() {
            if let Some(p) = pending.take() {
                to_server.write_all(&p.raw).await?;
            }
            to_server.write_all(&head[..n]).await?;
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_BLOCK {
            // Far beyond any frame size the server allows (it will refuse it): no buffering.
            return pass_through(head.to_vec(), pending.take(), from_client, to_server).await;
        }
        let mut payload = vec![0u8; len];
        from_client.read_exact(&mut payload).await?;
        let frame = [&head[..], &payload[..]].concat();
        let continues = pending.as_ref().is_some_and(|p| p.stream == stream);
        let in_block = pending.is_some();
        let followed = match (kind, pending.as_mut()) {
            (HEADERS, None) => {
                pending = Pending::start(stream, flags, &payload, &frame);
                pending.is_some()
            }
            (CONTINUATION, Some(p)) if continues => p.extend(&payload, &frame),
            _ if in_block => {
                // A block interrupted (a protocol error the server will judge): the table can
                // no longer be followed.
                return pass_through(frame, pending.take(), from_client, to_server).await;
            }
            _ => {
                // Not a header block: as is.
                to_server.write_all(&frame).await?;
                continue;
            }
        };
        if !followed {
            // Malformed or oversized: the table can no longer be followed.
            return pass_through(frame, pending.take(), from_client, to_server).await;
        }
        let Some(p) = pending.take() else { continue };
        if flags & END_HEADERS == 0 {
            pending = Some(p);
            continue;
        }
        match rewrite_block(&mut table, &p.block) {
            Ok(None) => to_server.write_all(&p.raw).await?,
            Ok(Some(block)) => to_server.write_all(&p.frames(&block)).await?,
            Err(()) => {
                to_server.write_all(&p.raw).await?;
                tokio::io::copy(&mut from_client, &mut to_server).await?;
                break;
            }
        }
    }
    to_server.shutdown().await
}

async fn pass_through<R, W>(frame: Vec<u8>, pending: Option<Pending>, mut from: R, mut to: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Some(p) = pending {
        to.write_all(&p.raw).await?;
    }
    to.write_all(&frame).await?;
    tokio::io::copy(&mut from, &mut to).await?;
    to.shutdown().await
}

/// Reads until `buf` is full or the peer closes; answers how many bytes were read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A header block being collected from a HEADERS frame and its CONTINUATIONs.
struct Pending {
    stream: u32,
    /// END_STREAM and PRIORITY of the HEADERS frame.
    flags: u8,
    /// The priority fields, when PRIORITY is set.
    priority: Vec<u8>,
    /// The block's fragments, padding removed.
    block: Vec<u8>,
    /// The frames as received, sent on unchanged when nothing needs rewriting.
    raw: Vec<u8>,
}

impl Pending {
    fn start(stream: u32, flags: u8, payload: &[u8], frame: &[u8]) -> Option<Pending> {
        let mut body = payload;
        if flags & PADDED != 0 {
            let (&pad, rest) = body.split_first()?;
            body = rest.get(..rest.len().checked_sub(pad as usize)?)?;
        }
        let mut priority = Vec::new();
        if flags & PRIORITY != 0 {
            priority = body.get(..5)?.to_vec();
            body = &body[5..];
        }
        Some(Pending { stream, flags: flags & (END_STREAM | PRIORITY), priority, block: body.to_vec(), raw: frame.to_vec() })
    }

    /// Adds a CONTINUATION; false (and nothing added) when the block would grow too large.
    fn extend(&mut self, payload: &[u8], frame: &[u8]) -> bool {
        if self.block.len() + payload.len() > MAX_BLOCK {
            return false;
        }
        self.block.extend_from_slice(payload);
        self.raw.extend_from_slice(frame);
        true
    }

    /// HEADERS (+ CONTINUATION) frames carrying `block`, none larger than any peer accepts.
    fn frames(&self, block: &[u8]) -> Vec<u8> {
        let mut first = self.priority.clone();
        let room = MIN_MAX_FRAME - first.len();
        let cut = block.len().min(room);
        first.extend_from_slice(&block[..cut]);
        let mut chunks = vec![(HEADERS, self.flags, first)];
        chunks.extend(block[cut..].chunks(MIN_MAX_FRAME).map(|c| (CONTINUATION, 0, c.to_vec())));
        let last = chunks.len() - 1;
        chunks[last].1 |= END_HEADERS;
        let mut out = Vec::with_capacity(block.len() + 9 * chunks.len() + 5);
        for (kind, flags, payload) in chunks {
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
            out.extend_from_slice(&[kind, flags]);
            out.extend_from_slice(&self.stream.to_be_bytes());
            out.extend_from_slice(&payload);
        }
        out
    }
}

/// The names of HPACK's static table (RFC 7541, appendix A), index 1 first.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// The client encoder's dynamic table as the relay follows it: names and entry sizes, newest
/// first (values are not needed: an `:authority` is rewritten before it is stored).
struct Table {
    entries: std::collections::VecDeque<(Vec<u8>, usize)>,
    size: usize,
    max: usize,
}

impl Table {
    fn new() -> Table {
        Table { entries: Default::default(), size: 0, max: INITIAL_TABLE }
    }

    fn name(&self, index: usize) -> Option<&[u8]> {
        match index {
            0 => None,
            1..=61 => Some(STATIC_NAMES[index - 1].as_bytes()),
            _ => self.entries.get(index - 62).map(|(n, _)| n.as_slice()),
        }
    }

    fn evict(&mut self) {
        while self.size > self.max {
            let Some((_, s)) = self.entries.pop_back() else { break };
            self.size -= s;
        }
    }

    fn insert(&mut self, name: Vec<u8>, value_len: usize) {
        let size = name.len() + value_len + 32;
        self.entries.push_front((name, size));
        self.size += size;
        self.evict();
    }
}

/// Decodes an HPACK integer with an `n`-bit prefix at `pos`, advancing it.
fn integer(buf: &[u8], pos: &mut usize, n: u32) -> Result<usize, ()> {
    let mask = (1usize << n) - 1;
    let mut v = (*buf.get(*pos).ok_or(())? as usize) & mask;
    *pos += 1;
    if v < mask {
        return Ok(v);
    }
    for shift in (0..28).step_by(7) {
        let b = *buf.get(*pos).ok_or(())?;
        *pos += 1;
        v += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(())
}

/// Decodes an HPACK string literal at `pos`, advancing it.
fn string(buf: &[u8], pos: &mut usize) -> Result<Vec<u8>, ()> {
    let huffman = *buf.get(*pos).ok_or(())? & 0x80 != 0;
    let len = integer(buf, pos, 7)?;
    let raw = buf.get(*pos..pos.checked_add(len).ok_or(())?).ok_or(())?;
    *pos += len;
    if huffman { huffman_decode(raw) } else { Ok(raw.to_vec()) }
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    let start = out.len();
    let mut v = s.len();
    if v < 127 {
        out.push(v as u8);
    } else {
        out.push(127);
        v -= 127;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }
    debug_assert!(out[start] & 0x80 == 0, "plain (not Huffman) literal");
    out.extend_from_slice(s);
}

/// Whether h2 accepts `value` as an `:authority`.
fn parses(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

/// `value` with every byte outside a URI host's unreserved characters replaced by `-`: the
/// same length, and a valid authority unless empty.
fn tame(value: &[u8]) -> Vec<u8> {
    value.iter().map(|&b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { b } else { b'-' }).collect()
}

/// Follows one header block through `table`; answers the block with each unparsable
/// `:authority` rewritten, or `None` when it needs no change.
fn rewrite_block(table: &mut Table, block: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    let mut out = Vec::new();
    let mut copied = 0; // block[..copied] is already in `out`
    let mut changed = false;
    let mut pos = 0;
    while pos < block.len() {
        let b = block[pos];
        if b & 0x80 != 0 {
            // Indexed field: refers to an entry already rewritten when stored.
            table.name(integer(block, &mut pos, 7)?).ok_or(())?;
            continue;
        }
        if b & 0xe0 == 0x20 {
            let max = integer(block, &mut pos, 5)?;
            if max > INITIAL_TABLE.max(1 << 16) {
                return Err(());
            }
            table.max = max;
            table.evict();
            continue;
        }
        // A literal: with incremental indexing (01), without (0000) or never indexed (0001).
        let indexing = b & 0xc0 == 0x40;
        let index = integer(block, &mut pos, if indexing { 6 } else { 4 })?;
        let name = if index == 0 { string(block, &mut pos)? } else { table.name(index).ok_or(())?.to_vec() };
        let value_at = pos;
        let mut value = string(block, &mut pos)?;
        if name == b":authority" && !value.is_empty() && !parses(&value) {
            value = tame(&value);
            out.extend_from_slice(&block[copied..value_at]);
            encode_string(&mut out, &value);
            copied = pos;
            changed = true;
        }
        if indexing {
            table.insert(name, value.len());
        }
    }
    if !changed {
        return Ok(None);
    }
    out.extend_from_slice(&block[copied..]);
    Ok(Some(out))
}

/// Code lengths of HPACK's canonical Huffman code (RFC 7541, appendix B), by symbol; EOS (256)
/// is 30 bits.
const CODE_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, 6, 10,
    10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6,
    7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23,
    21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22,
    22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28,
    27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27,
    26,
];

/// The canonical code as decoding tables: per length, the first code, where its symbols start
/// in `symbols`, and how many there are.
struct Huffman {
    symbols: Vec<u16>,
    first_code: [u32; 31],
    first_index: [usize; 31],
    count: [u32; 31],
}

fn huffman() -> &'static Huffman {
    static H: std::sync::OnceLock<Huffman> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        let len = |s: u16| if s == 256 { 30 } else { CODE_LENGTHS[s as usize] as usize };
        let mut symbols: Vec<u16> = (0..=256).collect();
        symbols.sort_by_key(|&s| (len(s), s));
        let mut h = Huffman { symbols, first_code: [0; 31], first_index: [0; 31], count: [0; 31] };
        for &s in &h.symbols {
            h.count[len(s)] += 1;
        }
        let (mut code, mut index) = (0u32, 0usize);
        for l in 1..=30 {
            h.first_code[l] = code;
            h.first_index[l] = index;
            code = (code + h.count[l]) << 1;
            index += h.count[l] as usize;
        }
        h
    })
}

fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, ()> {
    let h = huffman();
    let mut out = Vec::with_capacity(input.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for byte in input {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len > 30 {
                return Err(());
            }
            let offset = code.wrapping_sub(h.first_code[len]);
            if h.count[len] > 0 && code >= h.first_code[len] && offset < h.count[len] {
                let sym = h.symbols[h.first_index[len] + offset as usize];
                if sym == 256 {
                    return Err(()); // EOS inside a string is a decoding error
                }
                out.push(sym as u8);
                (code, len) = (0, 0);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        hex::decode(s).unwrap()
    }

    #[test]
    fn huffman_decodes_the_rfc_examples() {
        // RFC 7541, C.4.1–C.4.3.
        assert_eq!(huffman_decode(&unhex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")).unwrap(), b"www.example.com");
        assert_eq!(huffman_decode(&unhex("a8eb 1064 9cbf")).unwrap(), b"no-cache");
        assert_eq!(huffman_decode(&unhex("25a8 49e9 5ba9 7d7f")).unwrap(), b"custom-key");
        assert!(huffman_decode(&unhex("f1e3 c2e5 f23a 6ba0 ab90 f400")).is_err(), "padding must be ones");
    }

    /// A Huffman encoder built from the same canonical table, for test input.
    fn huffman_encode(input: &[u8]) -> Vec<u8> {
        let h = huffman();
        let mut code_of = vec![(0u32, 0usize); 257];
        for l in 1..=30 {
            for k in 0..h.count[l] as usize {
                code_of[h.symbols[h.first_index[l] + k] as usize] = (h.first_code[l] + k as u32, l);
            }
        }
        let (mut out, mut acc, mut bits) = (Vec::new(), 0u64, 0usize);
        for &b in input {
            let (code, len) = code_of[b as usize];
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        out
    }

    #[test]
    fn huffman_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
        assert_eq!(huffman_encode(b"www.example.com"), unhex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"));
    }

    #[test]
    fn a_huffman_coded_raw_path_is_rewritten_as_a_plain_literal() {
        // grpc-java's form: the raw socket path, Huffman-coded, stored in the dynamic table.
        let path = b"/var/lib/kubelet/plugins/csi.holdfast.dev/csi.sock";
        let coded = huffman_encode(path);
        let mut block = vec![0x41, 0x80 | coded.len() as u8];
        block.extend_from_slice(&coded);
        let mut table = Table::new();
        let out = rewrite_block(&mut table, &block).unwrap().expect("rewritten");
        let mut want = vec![0x41, path.len() as u8];
        want.extend_from_slice(b"-var-lib-kubelet-plugins-csi.holdfast.dev-csi.sock");
        assert_eq!(out, want);
        assert!(parses(&want[2..]));
        assert_eq!(table.size, 10 + path.len() + 32);
        assert_eq!(table.name(62), Some(&b":authority"[..]));
    }

    #[test]
    fn unparsable_authorities_are_rewritten_to_the_same_length() {
        // :method POST (indexed 3), :authority literal with incremental indexing (name index 1).
        let value = b"tmp%2Fholdfast%2Fcsi.sock";
        let mut block = vec![0x83, 0x41, value.len() as u8];
        block.extend_from_slice(value);
        block.push(0xbe); // indexed 62: the entry just stored
        let mut table = Table::new();
        let out = rewrite_block(&mut table, &block).unwrap().expect("rewritten");
        let mut want = vec![0x83, 0x41, value.len() as u8];
        want.extend_from_slice(b"tmp-2Fholdfast-2Fcsi.sock");
        want.push(0xbe);
        assert_eq!(out, want);
        assert_eq!(table.size, 10 + value.len() + 32, "the server stores an entry of the client's size");

        // A valid authority, and a block that only refers to the table, are left alone.
        let mut ok = vec![0x01, 9];
        ok.extend_from_slice(b"localhost");
        assert_eq!(rewrite_block(&mut Table::new(), &ok).unwrap(), None);
        assert_eq!(rewrite_block(&mut table, &[0x83, 0xbe]).unwrap(), None);
        // A Huffman-coded raw path, as grpc-java sends, becomes a plain literal.
        let mut java = vec![0x01];
        let huff = unhex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"); // "www.example.com": valid, kept
        java.push(0x80 | huff.len() as u8);
        java.extend_from_slice(&huff);
        assert_eq!(rewrite_block(&mut Table::new(), &java).unwrap(), None);
        // Malformed input is refused, not guessed at.
        assert!(rewrite_block(&mut Table::new(), &[0x41, 0x7f]).is_err());
        assert!(rewrite_block(&mut Table::new(), &[0x80]).is_err(), "index 0");
    }

    #[tokio::test]
    async fn relay_rewrites_header_frames_and_passes_the_rest() {
        let value = b"/run/holdfast/csi.sock";
        let mut block = vec![0x83, 0x01, value.len() as u8];
        block.extend_from_slice(value);
        let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            f.extend_from_slice(&[kind, flags]);
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let settings = frame(0x4, 0, 0, &[]);
        // Split over HEADERS (padded) + CONTINUATION.
        let mut padded = vec![2u8];
        padded.extend_from_slice(&block[..4]);
        padded.extend_from_slice(&[0, 0]);
        let input = [
            PREFACE.to_vec(),
            settings.clone(),
            frame(HEADERS, PADDED | END_STREAM, 1, &padded),
            frame(CONTINUATION, END_HEADERS, 1, &block[4..]),
            frame(0x0, END_STREAM, 3, b"data"),
        ]
        .concat();
        let mut out = Vec::new();
        relay(&input[..], &mut out).await.unwrap();
        let mut want_block = vec![0x83, 0x01, value.len() as u8];
        want_block.extend_from_slice(b"-run-holdfast-csi.sock");
        let want =
            [PREFACE.to_vec(), settings, frame(HEADERS, END_STREAM | END_HEADERS, 1, &want_block), frame(0x0, END_STREAM, 3, b"data")]
                .concat();
        assert_eq!(out, want);

        // Not HTTP/2: byte for byte.
        let mut out = Vec::new();
        relay(&b"GET / HTTP/1.1\r\n\r\n"[..], &mut out).await.unwrap();
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }
}
