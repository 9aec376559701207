//! One connection: read request lines, answer each, until the host closes it.

use std::fs::File;
use std::io::Write;

use termlab_protocol::line::{LineBuffer, LineError};
use termlab_protocol::{
    ErrorKind, ErrorReply, HelloReply, Request, RequestBody, Response, ResponseBody,
    MAX_REQUEST_LINE_BYTES, PROTOCOL_VERSION,
};

use crate::agent::Agent;
use crate::ops;

pub fn serve(connection: File, agent: &Agent) {
    let mut lines = LineBuffer::new(MAX_REQUEST_LINE_BYTES);
    loop {
        let (response, shutdown) = match lines.read_line(&mut &connection) {
            Ok(line) => answer(&line, agent),
            Err(error @ LineError::TooLong { .. }) => (
                Response::error(None, ErrorReply::new(ErrorKind::LineTooLong, error.to_string())),
                false,
            ),
            Err(LineError::Closed { unterminated_bytes }) => {
                if unterminated_bytes > 0 {
                    log!("connection closed inside a request ({unterminated_bytes} bytes dropped)");
                }
                return;
            }
            Err(LineError::Io(error)) => {
                log!("connection read failed: {error}");
                return;
            }
        };
        if let Err(error) = (&connection).write_all(&encode(&response)) {
            log!("cannot send response {:?}: {error}", response.id);
            return;
        }
        // Only after the reply: the log is the serial console, whose every byte is a VM
        // exit, slow under nesting; it must not delay what the host is waiting for.
        if let Err(error) = &response.outcome {
            match response.id {
                Some(id) => log!("request {id} failed: {error}"),
                None => log!("rejected request line: {error}"),
            }
        }
        if shutdown {
            agent.shut_down();
        }
    }
}

fn encode(response: &Response) -> Vec<u8> {
    response.to_line().unwrap_or_else(|error| {
        let fallback = Response::error(
            response.id,
            ErrorReply::new(ErrorKind::Internal, format!("cannot encode the response: {error}")),
        );
        // This one has only plain strings and cannot fail; the empty line would still keep the
        // framing intact.
        fallback.to_line().unwrap_or_else(|_| b"\n".to_vec())
    })
}

/// The response to one line, and whether the agent must shut down once it is sent.
fn answer(line: &[u8], agent: &Agent) -> (Response, bool) {
    let request = match Request::parse_line(line) {
        Ok(request) => request,
        Err(error) => {
            return (Response::error(error.id, ErrorReply::new(error.kind, error.message)), false);
        }
    };
    let shutdown = matches!(request.body, RequestBody::Shutdown {});
    let outcome = execute(request.body, agent);
    let shutdown = shutdown && outcome.is_ok();
    (Response { id: Some(request.id), outcome }, shutdown)
}

fn execute(body: RequestBody, agent: &Agent) -> Result<ResponseBody, ErrorReply> {
    body.validate()
        .map_err(|error| ErrorReply::new(ErrorKind::InvalidRequest, error.to_string()))?;
    let processes = &agent.processes;
    Ok(match body {
        RequestBody::Hello(hello) => {
            if hello.protocol_version != PROTOCOL_VERSION {
                return Err(ErrorReply::new(
                    ErrorKind::VersionMismatch,
                    format!(
                        "agent speaks protocol version {PROTOCOL_VERSION}, not {}",
                        hello.protocol_version
                    ),
                ));
            }
            ResponseBody::Hello(HelloReply {
                protocol_version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            })
        }
        RequestBody::Run(run) => ResponseBody::Run(processes.run(run)?),
        RequestBody::Spawn(spawn) => ResponseBody::Spawn(processes.spawn(spawn)?),
        RequestBody::ReadOutput(read) => ResponseBody::ReadOutput(processes.read_output(&read)?),
        RequestBody::WaitOutput(wait) => ResponseBody::WaitOutput(processes.wait_output(wait)?),
        RequestBody::Kill(kill) => {
            processes.kill(kill.handle, kill.signal)?;
            ResponseBody::Kill {}
        }
        RequestBody::Wait(wait) => {
            ResponseBody::Wait(processes.wait(wait.handle, wait.timeout_ms)?)
        }
        RequestBody::ReadFile(read) => ResponseBody::ReadFile(ops::read_file(&read)?),
        RequestBody::WriteFile(write) => ResponseBody::WriteFile(ops::write_file(&write)?),
        RequestBody::Clock {} => ResponseBody::Clock(ops::clock()),
        RequestBody::Terminate(terminate) => ResponseBody::Terminate(ops::terminate(&terminate)?),
        RequestBody::Shutdown {} => ResponseBody::Shutdown {},
    })
}
