{{/* Names: FULLNAME is the release name, suffixed with the chart's unless it contains it. */}}
{{- define "posttrain.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "posttrain.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: posttrain
{{- end -}}

{{- define "posttrain.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "posttrain.operatorServiceAccount" -}}
{{- .Values.serviceAccount.name | default (printf "%s-operator" (include "posttrain.fullname" .)) -}}
{{- end -}}

{{/* Namespaces where trainer pods run: trainer.namespaces, else the watched ones, else the
release namespace (when every namespace is watched, others are added by the user). */}}
{{- define "posttrain.trainerNamespaces" -}}
{{- $ns := .Values.trainer.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- toJson $ns -}}
{{- end -}}

{{- define "posttrain.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The default trainer image of one accelerator family: dict "root" . "family" "tpu" */}}
{{- define "posttrain.trainerImage" -}}
{{- $v := .root.Values.trainer.image -}}
{{- $override := get $v.overrides .family -}}
{{- $override | default (printf "%s:%s-%s" $v.repository ($v.tag | default .root.Chart.AppVersion) .family) -}}
{{- end -}}

{{/* Refuse to install without JobSet: the operator's JobSets would be rejected otherwise. */}}
{{- define "posttrain.requireJobSet" -}}
{{- $api := index .Chart.Annotations "posttrain.dev/jobset-api-version" -}}
{{- if and .Values.jobset.check (not (.Capabilities.APIVersions.Has (printf "%s/JobSet" $api))) -}}
{{- fail (printf "\n\nposttrain needs JobSet (%s, %s or newer), which this cluster does not serve.\nInstall it first, e.g.\n  helm install jobset oci://registry.k8s.io/jobset/charts/jobset --version %s -n jobset-system --create-namespace\n(see docs/install.md). For `helm template`, pass --api-versions %s/JobSet or --set jobset.check=false." $api (index .Chart.Annotations "posttrain.dev/jobset-min-version") (trimPrefix "v" (index .Chart.Annotations "posttrain.dev/jobset-min-version")) $api) -}}
{{- end -}}
{{- end -}}
