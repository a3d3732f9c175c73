// Validates custom resources (a JSON array of objects on standard input) against the schemas
// of their operators' API types, which kubernetes-validate does not know: prometheus-operator's
// (@kubernetes-models/prometheus-operator, generated from its Go API types: field types,
// required fields, enums and formats). Like the CRD's own schema it does not reject unknown
// fields (the API server prunes those). Prints one line per problem; exits 1 on any, and on a
// kind it has no schema for.
import { readFileSync } from "node:fs";
import * as monitoringV1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const groups = { "monitoring.coreos.com/v1": monitoringV1 };

const docs = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const doc of docs) {
  const name = `${doc.kind}/${doc.metadata?.name}`;
  const Model = groups[doc.apiVersion]?.[doc.kind];
  if (typeof Model !== "function") {
    console.log(`${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`${name}: valid ${doc.apiVersion} ${doc.kind}`);
  } catch (e) {
    console.log(`${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
