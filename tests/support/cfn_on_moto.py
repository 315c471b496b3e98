"""Creates stockflow's CloudFormation stacks on a moto server and says what it made.

Usage: python cfn_on_moto.py ENDPOINT TEMPLATE_DIR PREFIX STACK[,STACK...]
Prints one JSON object: {stack: {"status": ..., "types": [resource types created], "error": ...}}.
moto's CloudFormation skips resource types it does not support and still reports
CREATE_COMPLETE, so the caller compares `types` with the template's.
(boto3 comes with moto[server] in the emulators' venv of scripts/services.sh.)
"""
import json
import sys
import warnings

import boto3

warnings.simplefilter("ignore")
endpoint, tdir, prefix, stacks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
cf = boto3.client("cloudformation", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
params = {
    "state-tables": {"TablePrefix": prefix, "Prefix": prefix},
    "stream": {"Prefix": prefix, "ShardCount": "2"},
    "consumers": {"Prefix": prefix, "TablePrefix": prefix, "ImageTag": "test", "VpcId": "vpc-12345678",
                  "SubnetIds": "subnet-12345678", "ShardCount": "2"},
}
out = {}
for name in stacks:
    stack = f"{prefix}-{name}"
    try:
        cf.create_stack(StackName=stack, TemplateBody=open(f"{tdir}/{name}.json").read(),
                        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.get(name, {}).items()],
                        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"])
        status = cf.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
        resources = cf.list_stack_resources(StackName=stack)["StackResourceSummaries"]
        out[name] = {"status": status, "types": sorted({r["ResourceType"] for r in resources if r["ResourceType"]})}
    except Exception as e:  # reported, judged by the caller
        out[name] = {"status": "ERROR", "types": [], "error": str(e)[:500]}
print(json.dumps(out))
