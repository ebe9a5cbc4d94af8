//! The protobuf codec of every mesh API: tonic's prost codec with small starting buffers.
//!
//! tonic starts each call's encode buffer (and each streaming response's decode buffer) at
//! 8 KiB and keeps it for as long as the call lives. Watch streams carry a few hundred bytes
//! at a time and live for hours: the controller holds one per proxy per target (80 MB at
//! 10,000 streams), a proxy one per target it talks to. The buffers still grow for a larger
//! message. Set as the generated code's codec in `build.rs`.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Starting size of a call's buffers: a typical update with its gRPC frame header.
const START_BUFFER: usize = 512;

/// How much a response stream batches before handing its bytes on. tonic's default (32 KiB)
/// encodes every ready message into one buffer, and the buffer keeps that size for the life
/// of the call: a controller stream sending a large set in several updates would grow to hold
/// them all. At this size each message larger than a small one goes on by itself, and small
/// ones still share a frame.
const YIELD_THRESHOLD: usize = START_BUFFER;

/// [`ProstCodec`] with [`START_BUFFER`]-sized buffers.
#[derive(Debug)]
pub struct LeanCodec<T, U> {
    _messages: PhantomData<fn() -> (T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(START_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
