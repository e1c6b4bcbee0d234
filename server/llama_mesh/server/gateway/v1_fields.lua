-- v1_fields.lua: refuses /v1 JSON request bodies with fields the method does not have.
--
-- The gRPC-JSON transcoder drops unknown JSON fields silently, so {"inputs": {...}} (a typo
-- of "input") would run a task with an empty input. This filter runs after the buffer
-- filter (the body is complete) and before the transcoder. For a /v1 request whose method
-- and path match a rule of V1_BODY_RULES (generated from the google.api.http annotations
-- and put above this code), every key of the top-level JSON object must be one of the
-- rule's fields (proto names or their lowerCamelCase JSON names); else the reply is
-- 400 (INVALID_ARGUMENT) with a message naming the field. Nested objects (a task's input) are
-- not looked into. The Llama Deploy 0.8 paths (not under /v1/) are left as they are.

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

-- The keys of text's top-level object, as their JSON string tokens without the quotes; nil
-- when text is not an object (the transcoder then says what is wrong with it).
local function top_level_keys(text)
  local i = select(2, string.find(text, "^[ \t\r\n]*")) + 1
  if string.sub(text, i, i) ~= "{" then
    return nil
  end
  local keys = {}
  local depth = 0
  local expect_key = false
  local n = #text
  while i <= n do
    local c = string.sub(text, i, i)
    if c == '"' then
      local stop = string_end(text, i)
      if stop == nil then
        return nil
      end
      if depth == 1 and expect_key then
        keys[#keys + 1] = string.sub(text, i + 1, stop - 2)
        expect_key = false
      end
      i = stop
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
  return keys
end

local function rule_for(method, path)
  for _, rule in ipairs(V1_BODY_RULES) do
    if rule.method == method and string.find(path, rule.pattern) then
      return rule
    end
  end
  return nil
end

local function refuse(request_handle, key, rule)
  local shown = key
  if not string.find(key, "^[%w_%-%.@%$]*$") then
    shown = "(a name with special characters)"
  end
  local message = "unknown field '" .. shown .. "' in the request body of " .. rule.method
    .. " " .. rule.template .. " (its fields: " .. rule.listing .. ")"
  -- A local reply: the gateway's local_reply_config makes it {"code":3,"message":...}.
  request_handle:respond({[":status"] = "400", ["content-type"] = "text/plain"}, message)
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local path = headers:get(":path") or ""
  if string.sub(path, 1, 4) ~= "/v1/" then
    return
  end
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    return
  end
  local rule = rule_for(headers:get(":method") or "", (string.gsub(path, "%?.*$", "")))
  if rule == nil then
    return
  end
  local body = request_handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  local keys = top_level_keys(body:getBytes(0, body:length()))
  if keys == nil then
    return
  end
  for _, key in ipairs(keys) do
    if not rule.fields[key] then
      refuse(request_handle, key, rule)
      return
    end
  end
end
