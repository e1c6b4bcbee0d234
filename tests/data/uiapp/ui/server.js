// A tiny deployment UI for llama-mesh's tests, on Node's built-ins only. It serves under
// LLAMA_DEPLOY_NEXTJS_BASE_PATH (404 elsewhere), on PORT, and echoes WebSocket text
// frames at <base>/ws (the upgrade handled by hand: no package needed).
"use strict";
const crypto = require("crypto");
const http = require("http");

const base = process.env.LLAMA_DEPLOY_NEXTJS_BASE_PATH || "";
const port = Number(process.env.PORT || 3000);

const server = http.createServer((req, res) => {
  const path = req.url.split("?")[0];
  if (path !== base && !path.startsWith(base + "/")) {
    res.writeHead(404, { "content-type": "text/plain" });
    res.end(`not under ${base}: ${path}\n`);
    return;
  }
  const page = JSON.stringify({
    page: "tiny ui",
    path: req.url,
    method: req.method,
    deployment: process.env.LLAMA_DEPLOY_NEXTJS_DEPLOYMENT_NAME,
    greeting: process.env.UI_GREETING,
    pid: process.pid,
  });
  res.writeHead(200, { "content-type": "application/json" });
  res.end(page);
});

// One unmasked text frame (a server's frames are not masked).
function frame(text) {
  const payload = Buffer.from(text);
  if (payload.length >= 126) throw new Error("the test echo keeps to short messages");
  return Buffer.concat([Buffer.from([0x81, payload.length]), payload]);
}

server.on("upgrade", (req, socket) => {
  if (req.url.split("?")[0] !== `${base}/ws`) {
    socket.end("HTTP/1.1 404 Not Found\r\n\r\n");
    return;
  }
  const accept = crypto
    .createHash("sha1")
    .update(req.headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
    .digest("base64");
  socket.write(
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
      `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
  );
  let buffered = Buffer.alloc(0);
  socket.on("data", (chunk) => {
    buffered = Buffer.concat([buffered, chunk]);
    // Client frames: short (< 126 bytes) and masked.
    while (buffered.length >= 6) {
      const opcode = buffered[0] & 0x0f;
      const length = buffered[1] & 0x7f;
      if (buffered.length < 6 + length) return;
      const mask = buffered.subarray(2, 6);
      const data = Buffer.from(buffered.subarray(6, 6 + length));
      for (let i = 0; i < data.length; i++) data[i] ^= mask[i % 4];
      buffered = buffered.subarray(6 + length);
      if (opcode === 0x8) {
        socket.end(Buffer.from([0x88, 0]));
        return;
      }
      if (opcode === 0x1) socket.write(frame("echo: " + data.toString()));
    }
  });
});

server.listen(port, "127.0.0.1", () => {
  console.log(`tiny ui on 127.0.0.1:${port} under ${base}`);
});
process.on("SIGTERM", () => process.exit(0));
