-- request_guard.lua: refuses requests a web page could make someone's browser send.
--
-- A page on any site can send simple requests (form posts, text/plain fetches: no CORS
-- preflight) to a server on the user's machine, and through DNS rebinding even read the
-- answers. So, before anything else acts on a request:
--
-- 1. Host: the host name (port aside) must be one the gateway answers to (GUARD.hosts,
--    unless GUARD.any_host); else 403. A rebound name (evil.example -> 127.0.0.1) is not.
-- 2. Origin: when present, it must be an allowed CORS origin (GUARD.origins, or any with
--    GUARD.any_origin) or the gateway's own (scheme://Host); else 403.
-- 3. Content type: when given, or when a body is, it must be application/json
--    (multipart/form-data too on GUARD.multipart_paths); else 415. gRPC and gRPC-Web
--    content types (application/grpc*) go to gRPC method paths (/package.Service/Method):
--    gRPC-Web on any other path is a 415 too, answered as JSON (the request is marked as
--    not gRPC in compat_errors.lua's metadata); raw gRPC there is a 404, which Envoy
--    answers in gRPC (UNIMPLEMENTED).
--
-- A deployment's own web UI (/ui/NAME/... or /deployments/NAME/ui/...) passes after the
-- Host and Origin checks whatever its content type (it is not the JSON API): its route goes
-- to the cluster named in the UI_HEADER request header, set here from the path (replacing
-- any a client sent), which Envoy reads when it picks the route again (see uis.py). When
-- the server has API keys (GUARD.ui_api_key), a UI request must carry one, in the
-- Authorization header or (what a browser sends when it navigates) the UI_KEY_COOKIE
-- cookie; the API server judges it (a GetStatus call with it: keys live in one place).
--
-- Refusals are local replies: local_reply_config makes them google.rpc.Status JSON (the
-- message is the body given here), compat_errors.lua adds "detail" on 0.8 paths, and gRPC
-- clients get the matching grpc-status. GUARD is a table the gateway's config puts in
-- front of this source (see request_guard_lua in config.py).

local NAMESPACE = "llama_mesh.gateway"
local MAX_QUOTED = 200

local function quoted(value)
  if #value > MAX_QUOTED then
    value = string.sub(value, 1, MAX_QUOTED) .. "..."
  end
  return "'" .. value .. "'"
end

-- The host name of a Host header value: lower case, without port, brackets or final dot.
local function host_name(authority)
  local host = string.lower(authority)
  if string.sub(host, 1, 1) == "[" then
    local close = string.find(host, "]", 2, true)
    if close == nil then
      return nil
    end
    return string.sub(host, 2, close - 1)
  end
  local colon = string.find(host, ":", 1, true)
  if colon ~= nil then
    if string.find(host, ":", colon + 1, true) ~= nil then
      return nil -- an IPv6 address without brackets is no Host
    end
    host = string.sub(host, 1, colon - 1)
  end
  if #host > 1 and string.sub(host, -1) == "." then
    host = string.sub(host, 1, -2)
  end
  return host
end

local function refuse(request_handle, status, message)
  request_handle:respond({[":status"] = status, ["content-type"] = "text/plain"}, message)
end

local function host_refusal(authority)
  if GUARD.any_host then
    return nil
  end
  local host = authority and host_name(authority)
  if host ~= nil and GUARD.hosts[host] then
    return nil
  end
  return "host " .. quoted(authority or "") .. " is not a name this server answers to "
    .. "(Host header); its operator can allow it with --allowed-host"
end

local function origin_refusal(origin, authority)
  if origin == nil or GUARD.any_origin or GUARD.origins[origin] then
    return nil
  end
  if authority ~= nil and string.lower(origin) == GUARD.scheme .. "://" .. string.lower(authority) then
    return nil
  end
  return "origin " .. quoted(origin) .. " may not call this server (Origin header); its "
    .. "operator can allow it with --cors-origin"
end

-- Whether path is a gRPC method's: /package.Service/Method.
local function is_grpc_method(route)
  return string.find(route, "^/[%w_]+%.[%w_.]+/[%w_]+$") ~= nil
end

local function has_body(headers)
  local length = headers:get("content-length")
  if length ~= nil then
    return length ~= "0"
  end
  return headers:get("transfer-encoding") ~= nil
end

-- The status and message of a refusal of the request's content type, or nil.
local function content_type_refusal(headers, path)
  local content_type = headers:get("content-type")
  if content_type == nil then
    if has_body(headers) then
      return "415", "the request has a body but no content type; send application/json"
    end
    return nil
  end
  local media_type = string.lower(string.match(content_type, "^[ \t]*([^; \t]*)"))
  if media_type == "application/json" then
    return nil
  end
  local route = string.match(path, "^[^?#]*")
  if string.find(media_type, "application/grpc", 1, true) == 1 then
    if is_grpc_method(route) then
      return nil
    elseif string.find(media_type, "application/grpc-web", 1, true) == 1 then
      return "415", "content type " .. quoted(content_type) .. " is for gRPC method paths "
        .. "(/package.Service/Method); this is a JSON route: send application/json"
    end
    return "404", "no gRPC method at " .. quoted(route) .. " (gRPC methods are at "
      .. "/package.Service/Method)"
  end
  local accepted = "application/json"
  if GUARD.multipart_paths[route] then
    if media_type == "multipart/form-data" then
      return nil
    end
    accepted = "application/json or multipart/form-data"
  end
  return "415", "content type " .. quoted(content_type) .. " is not accepted here; send "
    .. accepted
end

local UI_HEADER = "x-llama-mesh-ui-cluster"
local UI_KEY_COOKIE = "llama_mesh_api_key"
local KEY_CHECK_METHOD = "/llama_mesh.v1.ApiServer/GetStatus"
local KEY_CHECK_TIMEOUT_MS = 10000

-- The request's bearer credential: its Authorization header, else its key cookie; or nil.
local function ui_credential(headers)
  local authorization = headers:get("authorization")
  if authorization ~= nil then
    return authorization
  end
  local cookies = headers:get("cookie") or ""
  for name, value in string.gmatch(cookies, "([^=;%s]+)=([^;]*)") do
    if name == UI_KEY_COOKIE and value ~= "" then
      return "Bearer " .. value
    end
  end
  return nil
end

-- The status and message of a refusal to reach a UI (no key, or one the API server
-- refuses), or nil.
local function ui_key_refusal(request_handle, headers)
  local credential = ui_credential(headers)
  if credential == nil then
    return "401", "this deployment UI needs an API key: send 'authorization: Bearer <key>' or "
      .. "the cookie " .. UI_KEY_COOKIE .. "=<key>"
  end
  -- An empty gRPC message (5 bytes of framing); a refused key is a trailers-only reply,
  -- its grpc-status in the headers.
  local reply = request_handle:httpCall(GUARD.upstream_cluster, {
    [":method"] = "POST",
    [":path"] = KEY_CHECK_METHOD,
    [":authority"] = "llama-mesh",
    ["content-type"] = "application/grpc",
    ["te"] = "trailers",
    ["authorization"] = credential,
  }, "\0\0\0\0\0", KEY_CHECK_TIMEOUT_MS)
  local status = reply["grpc-status"]
  if reply[":status"] == "200" and (status == nil or status == "0") then
    return nil
  end
  if status == "16" or status == "7" then
    return "401", "unknown API key for this deployment UI"
  end
  return "503", "the API key could not be checked (API server unavailable)"
end

-- The deployment whose UI path is route (no query), or nil.
local function ui_deployment(route)
  return string.match(route, "^/ui/([^/]+)") or string.match(route, "^/deployments/([^/]+)/ui$")
    or string.match(route, "^/deployments/([^/]+)/ui/")
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local authority = headers:get(":authority")
  local refusal = host_refusal(authority) or origin_refusal(headers:get("origin"), authority)
  if refusal ~= nil then
    refuse(request_handle, "403", refusal)
    return
  end
  local path = headers:get(":path") or ""
  local deployment = ui_deployment(string.match(path, "^[^?#]*"))
  if deployment ~= nil then
    if GUARD.ui_api_key then
      local status
      status, refusal = ui_key_refusal(request_handle, headers)
      if refusal ~= nil then
        refuse(request_handle, status, refusal)
        return
      end
      headers = request_handle:headers() -- the call yielded: the old wrapper is stale
    end
    headers:replace(UI_HEADER, "ui-" .. deployment)
    return
  end
  headers:remove(UI_HEADER)
  local status
  status, refusal = content_type_refusal(headers, path)
  if refusal ~= nil then
    local content_type = string.lower(headers:get("content-type") or "")
    if string.find(content_type, "application/grpc-web", 1, true) == 1 then
      -- Answered as the JSON route it called (Envoy answers raw gRPC in gRPC whatever
      -- happens here: UNIMPLEMENTED, with the message as grpc-message).
      request_handle:streamInfo():dynamicMetadata():set(NAMESPACE, "grpc", false)
    end
    refuse(request_handle, status, refusal)
  end
end
