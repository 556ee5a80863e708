{{/*
Named templates shared by every manifest of the chart: names, labels, images,
and the list of watched namespaces (computed once, here, so RBAC, peering,
the ServiceMonitor and the operator's env always agree).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubeinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: fullnameOverride, or "<release>-<chart>" (just the release name when it already contains the chart name). */}}
{{- define "kubeinfer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "name-version" of the chart, for the helm.sh/chart label. */}}
{{- define "kubeinfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator pod; never change them after release (Deployment selectors are immutable). */}}
{{- define "kubeinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Standard labels of every object, with commonLabels. */}}
{{- define "kubeinfer.labels" -}}
{{- include "kubeinfer.labelsWith" (dict "root" . "extra" dict) -}}
{{- end -}}

{{/*
Labels of one object: the chart's standard labels, then "extra" (pod labels, a
ServiceMonitor's own labels...), then commonLabels, merged as one map so a key
set twice is rendered once (a repeated key makes the manifest unparsable) and
the chart's own labels, the Deployment selector's among them, always win (the
schema refuses them in the values anyway). Call with (dict "root" $ "extra" map).
*/}}
{{- define "kubeinfer.labelsWith" -}}
{{- $root := .root -}}
{{- $standard := dict
    "helm.sh/chart" (include "kubeinfer.chart" $root)
    "app.kubernetes.io/name" (include "kubeinfer.name" $root)
    "app.kubernetes.io/instance" $root.Release.Name
    "app.kubernetes.io/component" "operator"
    "app.kubernetes.io/version" (toString $root.Chart.AppVersion)
    "app.kubernetes.io/part-of" "kubeinfer"
    "app.kubernetes.io/managed-by" $root.Release.Service -}}
{{- toYaml (merge $standard (.extra | default dict) ($root.Values.commonLabels | default dict)) -}}
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "kubeinfer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeinfer.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "Value serviceAccount.create is false but serviceAccount.name is empty: set serviceAccount.name to the existing ServiceAccount made for the operator (never the namespace's \"default\" one)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag, digest}: a digest wins, an empty tag means appVersion. Call with (dict "image" ... "root" $). */}}
{{- define "kubeinfer.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Watched namespaces as a JSON list; [] means cluster-wide. Fails with a clear message on contradictory values. */}}
{{- define "kubeinfer.watchedNamespaces" -}}
{{- if eq .Values.watch.scope "cluster" -}}
{{- if .Values.watch.namespaces -}}
{{- fail (printf "Value watch.namespaces is %v but watch.scope is \"cluster\": set watch.scope=namespaces to watch only those namespaces, or leave watch.namespaces empty" .Values.watch.namespaces) -}}
{{- end -}}
[]
{{- else -}}
{{- $namespaces := .Values.watch.namespaces | default (list .Release.Namespace) | uniq -}}
{{- toJson $namespaces -}}
{{- end -}}
{{- end -}}

{{/* Cross-field checks JSON Schema cannot express; fails the install with the values and the fix. Included once, by deployment.yaml. */}}
{{- define "kubeinfer.validateValues" -}}
{{- $ports := dict "operator.healthPort" .Values.operator.healthPort "operator.scalerPort" .Values.operator.scalerPort "operator.metricsPort" .Values.operator.metricsPort -}}
{{- $names := keys $ports | sortAlpha -}}
{{- range $i, $a := $names -}}
{{- range $b := slice $names (add1 $i) -}}
{{- if eq (int (get $ports $a)) (int (get $ports $b)) -}}
{{- fail (printf "Values %s and %s are both %d: the operator listens on each of its ports separately; give them different ports" $a $b (int (get $ports $a))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "Value serviceAccount.create is false but serviceAccount.name is empty: the operator would run as the namespace's \"default\" ServiceAccount, and (with rbac.create) every pod using that account would get the operator's permissions; set serviceAccount.name to the existing ServiceAccount made for the operator" -}}
{{- end -}}
{{- $fullname := include "kubeinfer.fullname" . -}}
{{- if gt (len $fullname) 46 -}}
{{- fail (printf "The object-name prefix %q is %d characters long: Service names such as %q must fit in 63; set fullnameOverride to a name of at most 46 characters" $fullname (len $fullname) (printf "%s-operator-metrics" $fullname)) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $fullname) -}}
{{- fail (printf "The object-name prefix %q is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter): Service names start with it; set fullnameOverride to such a name" $fullname) -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets as a list of {name}: takes [{name: x}] (the Kubernetes form) or plain names ["x"] (older values files). Call with the list. */}}
{{- define "kubeinfer.imagePullSecrets" -}}
{{- range . }}
- name: {{ if kindIs "string" . }}{{ . | quote }}{{ else }}{{ .name | quote }}{{ end }}
{{- end }}
{{- end -}}
