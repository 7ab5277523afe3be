{{/*
The permissions, in one place. Each rule is one that the operator or trainer code uses;
docs/operator.md gives the reason for each. tests/install checks that the two lists agree, that
the operator completes a job's lifecycle with exactly these, and that it can do nothing else.
No wildcards.
*/}}

{{/* The operator, in every namespace it watches. */}}
{{- define "posttrain.operatorRules" -}}
# Watch PostTrainJobs; read one not yet cached (kopf writes nothing to them: event handlers only).
- apiGroups: [posttrain.dev]
  resources: [posttrainjobs]
  verbs: [get, list, watch]
# Phase, conditions, restarts, times, summary.
- apiGroups: [posttrain.dev]
  resources: [posttrainjobs/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
- apiGroups: [posttrain.dev]
  resources: [posttrainjobs/finalizers]
  verbs: [update]
# The JobSet: read it, watch it for status, apply it (server-side apply is a patch; one that
# makes the object also needs create). Once made, only its spec.suspend changes.
- apiGroups: [jobset.x-k8s.io]
  resources: [jobsets]
  verbs: [get, list, watch, create, patch]
# The recipe: read it to check owner and content, apply it (made, or a stale one replaced).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# Which pods wait for nodes (Provisioning).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# Kueue: why a queued job waits (its JobSet's Workload's conditions), and when that changes;
# patch spec.active, which is how a queued job is suspended (spec.suspend).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, watch, patch]
# Events on PostTrainJobs; watch FailedCreate Events of the Jobs (why pods are refused).
- apiGroups: [""]
  resources: [events]
  verbs: [create, list, watch]
{{- if and (gt (int .Values.replicaCount) 1) .Values.watchNamespaces }}
# Peering (replicaCount > 1): keep-alives in the namespace's KopfPeering.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch, patch]
{{- end }}
{{- end -}}

{{/* The operator, cluster-scoped: kopf notices CRDs appearing, and, when it watches named
namespaces, their creation and deletion (it never reads namespaces when watching all). */}}
{{- define "posttrain.operatorClusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- else if gt (int .Values.replicaCount) 1 }}
# Peering (replicaCount > 1) when watching every namespace: keep-alives in the ClusterKopfPeering.
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch, patch]
{{- end }}
{{- end -}}

{{/* The trainer (rank 0), in each job's namespace: progress reports to its PostTrainJob. */}}
{{- define "posttrain.trainerRules" -}}
- apiGroups: [posttrain.dev]
  resources: [posttrainjobs/status]
  verbs: [get, patch]
{{- end -}}
