-- compat_errors.lua: the gateway's response touch-ups, run by envoy.filters.http.lua.
--
-- This filter sits before the gRPC-JSON transcoder in the filter chain, so it sees requests
-- before they are transcoded and responses after they are (Envoy runs encoders in reverse).
--
-- 1. Errors on Llama Deploy 0.8 paths (everything not under /v1/) get a FastAPI-style "detail"
--    field equal to the google.rpc.Status "message":
--      {"code":5,"message":"Deployment not found","details":[]}
--   -> {"detail":"Deployment not found","code":5,"message":"Deployment not found","details":[]}
--    The already-escaped JSON string token of "message" is copied verbatim, never decoded.
--    Only responses with status >= 400 are buffered; success (and streaming) bodies pass
--    through untouched.
-- 2. Transcoded (non-gRPC) responses lose the grpc-* headers the transcoder leaves on them.
-- 3. Requests are marked in dynamic metadata (namespace llama_mesh.gateway): "compat" for
--    0.8 paths, "grpc" for gRPC and gRPC-Web; the local_reply_config mappers read "grpc".

local NAMESPACE = "llama_mesh.gateway"
local GRPC_HEADERS = {
  "grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding",
}

-- Returns the index just past the JSON string token that starts (with '"') at i, or nil.
local function string_end(text, i)
  local j = i + 1
  local n = #text
  while j <= n do
    local c = string.sub(text, j, j)
    if c == "\\" then
      j = j + 2
    elseif c == '"' then
      return j + 1
    else
      j = j + 1
    end
  end
  return nil
end

local function skip_space(text, i)
  local _, last = string.find(text, "^[ \t\r\n]*", i)
  return last + 1
end

-- Scans the top-level object of text; returns the verbatim "message" string token (or nil)
-- and whether a top-level "detail" key is present. Returns nil, nil if text is not an object.
local function top_level_message(text)
  local i = skip_space(text, 1)
  if string.sub(text, i, i) ~= "{" then
    return nil, nil
  end
  local depth = 0
  local n = #text
  local message = nil
  local has_detail = false
  local expect_key = false
  while i <= n do
    local c = string.sub(text, i, i)
    if c == '"' then
      local stop = string_end(text, i)
      if stop == nil then
        return nil, nil
      end
      if depth == 1 and expect_key then
        local key = string.sub(text, i, stop - 1)
        local colon = skip_space(text, stop)
        if string.sub(text, colon, colon) ~= ":" then
          return nil, nil
        end
        local value = skip_space(text, colon + 1)
        if key == '"detail"' then
          has_detail = true
        elseif key == '"message"' and string.sub(text, value, value) == '"' then
          local value_stop = string_end(text, value)
          if value_stop == nil then
            return nil, nil
          end
          message = string.sub(text, value, value_stop - 1)
        end
        expect_key = false
        i = value
      else
        i = stop
      end
    else
      if c == "{" or c == "[" then
        depth = depth + 1
        expect_key = depth == 1
      elseif c == "}" or c == "]" then
        depth = depth - 1
      elseif c == "," and depth == 1 then
        expect_key = true
      end
      i = i + 1
    end
  end
  return message, has_detail
end

local function with_detail(text)
  local message, has_detail = top_level_message(text)
  if has_detail == nil or has_detail then
    return nil
  end
  local open = skip_space(text, 1)
  local rest = string.sub(text, open + 1)
  local sep = ","
  if string.find(rest, "^[ \t\r\n]*}") then
    sep = ""
  end
  return "{" .. '"detail":' .. (message or '""') .. sep .. rest
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local metadata = request_handle:streamInfo():dynamicMetadata()
  local path = headers:get(":path") or ""
  if string.sub(path, 1, 4) ~= "/v1/" then
    metadata:set(NAMESPACE, "compat", true)
  end
  -- gRPC and gRPC-Web (application/grpc-web*: the grpc_web filter runs later). The local
  -- reply mappers leave gRPC requests alone, so gRPC clients keep Envoy's plain grpc-message.
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    metadata:set(NAMESPACE, "grpc", true)
  end
end

function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    return
  end
  for _, name in ipairs(GRPC_HEADERS) do
    headers:remove(name)
  end
  local metadata = response_handle:streamInfo():dynamicMetadata():get(NAMESPACE)
  if metadata == nil or not metadata["compat"] then
    return
  end
  local status = tonumber(headers:get(":status")) or 0
  if status < 400 or string.find(content_type, "application/json", 1, true) ~= 1 then
    return
  end
  local body = response_handle:body()
  if body == nil then
    return
  end
  local patched = with_detail(body:getBytes(0, body:length()))
  if patched ~= nil then
    body:setBytes(patched)
  end
end
