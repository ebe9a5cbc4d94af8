//! Test helper: `orig-dst-echo LISTEN_ADDR NAME` answers every TCP connection with one HTTP
//! response whose body is `NAME ORIGINAL_DST` (or `NAME not redirected`), read with the proxy's
//! own `mesh_proxy::capture::original_dst`.
//!
//! Run inside a namespace with capture rules, it stands in for a proxy listener, so a test can
//! see where a redirected connection was going. HTTP so that an unmodified client (curl) can
//! ask. Prints `listening on ADDR` once bound, so the test knows when to connect.

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request head longer than this is not read further: the reply does not depend on it.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, name] = args.as_slice() else {
        eprintln!("usage: orig-dst-echo LISTEN_ADDR NAME");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(listen.as_str()).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("orig-dst-echo: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(address) => println!("listening on {address}"),
        Err(error) => {
            eprintln!("orig-dst-echo: {error}");
            return ExitCode::FAILURE;
        }
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let name = name.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &name).await {
                        eprintln!("orig-dst-echo: {error}");
                    }
                });
            }
            Err(error) => eprintln!("orig-dst-echo: accept: {error}"),
        }
    }
}

async fn answer(mut stream: TcpStream, name: &str) -> io::Result<()> {
    let destination = match mesh_proxy::capture::original_dst(&stream) {
        Ok(address) => address.to_string(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => "not redirected".to_owned(),
        Err(error) => format!("error: {error}"),
    };
    // Read the request head before answering: closing with unread input would reset the
    // connection and lose the answer.
    let mut head = Vec::new();
    let mut buffer = [0_u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD
        {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        io::Result::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request head within 5s"))??;
    let body = format!("{name} {destination}");
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
