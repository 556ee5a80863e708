-- Argo CD health of a kubeinfer Endpoint (resource.customizations.health.kubeinfer.io_Endpoint).
-- Healthy: the operator saw this generation and Ready is True (every Deployment rolled out).
-- Degraded: Stalled is True (InvalidSpec, ProgressDeadlineExceeded, NameConflict, RejectedByAPI).
-- Progressing: anything else, including a spec the operator has not reconciled yet.
local hs = {status = "Progressing", message = "Waiting for the kubeinfer operator"}
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local ready = nil
local stalled = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      ready = c
    elseif c.type == "Stalled" then
      stalled = c
    end
  end
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "") .. ": " .. (stalled.message or "")
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or ""
elseif ready ~= nil then
  hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
end
return hs
