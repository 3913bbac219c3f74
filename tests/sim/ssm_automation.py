"""A small SSM Automation simulator for imgbuild's tests.

moto answers StartAutomationExecution with HTTP 500 (not implemented), so a bake cannot run
against it. This server sits in front of moto on loopback: it plays the four Automation calls
itself (Start, Get, Stop, DescribeAutomationExecutions) and forwards every other request to moto
unchanged. An execution runs the registered document (read back from moto) step by step, and
its EC2 calls (RunInstances, StopInstances, CreateImage, TerminateInstances, Describe*) really
happen in moto. What it answers follows the service's documented shapes:

- an output of a step that has not succeeded reads "No output available yet because the step is
  not successfully executed" (aws-cli examples/ssm/get-automation-execution.rst);
- FailureMessage texts use the service's wording ("Step fails when it is ...", "... failed
  maximum allowed times");
- onFailure (Abort | Continue | step:NAME), onCancel (Abort | step:NAME), isEnd, nextStep,
  isCritical and aws:branch (StringEquals choices, Default) as the Automation actions reference
  describes them; the cancel path runs for at
  most two minutes, ignoring the target steps' own timeoutSeconds and maxAttempts;
- parameters are checked against allowedPattern at start (InvalidAutomationExecutionParameters);
- StopAutomationExecution on a finished execution is InvalidAutomationStatusUpdateException.

Time is scaled: one simulated second lasts SCALE real seconds. What the build instance would do
(the SSM agent coming Online, Run Command) is simulated; nothing runs on an instance.

Test controls (JSON over HTTP, not part of any AWS API):
  POST /sim/control {"fail_at": STEP, "hold_at": STEP, "status": FINAL, "terminate_secs": N}
    fail_at: that step fails (an executeAwsApi step fails after its call was made, as a
      CreateImage whose step failed after the image was registered; waitForInstance sees the
      launch die; waitForImage sees the image go `failed`).
    hold_at: that step runs until cancelled (or its own timeout).
    status: the final status to report instead of Success (Exited, CompletedWithSuccess, ...).
    terminate_secs: simulated seconds an instance takes to reach `terminated` after
      TerminateInstances (a waiting terminate on the cancel path then runs into the cap).
    pulled_digest: the digest the registry serves for the Chroma image (a command reading
      RepoDigests prints <repository>@<it>); by default the pinned one, else a fixed one.
    launch_fails_for: instance types for which RunInstances fails with
      InsufficientInstanceCapacity (EC2's error code and wording, "Troubleshoot Amazon EC2
      instance launch issues", Insufficient instance capacity); nothing is launched.
  POST /sim/setup {"project": NAME} -> subnet, security group and instance profile in moto.
  GET /sim/state -> every execution: status, current step, whether a hold is active.
"""

import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import yaml

MOTO = sys.argv[2]
PORT = int(sys.argv[1])
SCALE = float(sys.argv[3]) if len(sys.argv) > 3 else 0.01
CANCEL_CAP = 120  # simulated seconds ("Properties shared by all actions", onCancel)
PLACEHOLDER = "No output available yet because the step is not successfully executed"
FINAL = {"Success", "Failed", "TimedOut", "Cancelled", "CompletedWithSuccess", "CompletedWithFailure", "Exited", "Rejected"}

control = {}
executions = {}
tokens = {}
lock = threading.Lock()
terminating = {}  # instance id -> simulated time it reaches terminated


def client(service):
    return boto3.client(service, endpoint_url=MOTO, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")


def sim_now():
    return time.monotonic() / SCALE


def sleep(sim_secs):
    time.sleep(sim_secs * SCALE)


class Failed(Exception):
    pass


class Cancelled(Exception):
    pass


class TimedOut(Exception):
    pass


def jsonable(v):
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items() if k != "ResponseMetadata"}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def select(data, selector):
    """The JSONPath subset Automation selectors use: $.A.B[0].C"""
    cur = data
    for part in re.findall(r"\.([A-Za-z0-9_]+)|\[(\d+)\]", selector[1:]):
        key, index = part
        try:
            cur = cur[key] if key else cur[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def snake(api):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", api).lower()


class Execution:
    def __init__(self, eid, name, version, doc, params):
        self.id, self.name, self.version, self.doc, self.params = eid, name, version, doc, params
        self.status = "InProgress"
        self.steps = []
        self.outputs = {}
        self.failure = None
        self.cancel = threading.Event()
        self.holding = None
        self.current = None
        self.start = time.time()
        self.end = None

    def resolve(self, v):
        if isinstance(v, str):
            def sub(m):
                ref = m.group(1).strip()
                if ref in self.params:
                    return self.params[ref]
                if ref in self.outputs:
                    return self.outputs[ref]
                if ref.startswith("global:") or ref.startswith("automation:"):
                    return {"automation:EXECUTION_ID": self.id, "global:REGION": "us-east-1", "global:ACCOUNT_ID": "123456789012"}.get(ref, "x")
                raise Failed(f"Step fails when it is validating inputs. Reference {ref} cannot be resolved.")
            return re.sub(r"\{\{([^}]*)\}\}", sub, v)
        if isinstance(v, list):
            return [self.resolve(x) for x in v]
        if isinstance(v, dict):
            return {k: self.resolve(x) for k, x in v.items()}
        return v

    def answer(self):
        outs = {}
        for o in self.doc.get("outputs", []):
            outs[o] = [self.outputs.get(o, PLACEHOLDER)]
        a = {
            "AutomationExecutionId": self.id,
            "DocumentName": self.name,
            "DocumentVersion": self.version,
            "ExecutionStartTime": self.start,
            "AutomationExecutionStatus": self.status,
            "StepExecutions": [dict(s) for s in self.steps],
            "Parameters": {k: [v] for k, v in self.params.items()},
            "Outputs": outs,
            "Mode": "Auto",
        }
        if self.end:
            a["ExecutionEndTime"] = self.end
        if self.failure:
            a["FailureMessage"] = self.failure
        if self.current:
            a["CurrentStepName"] = self.current
        return a


def find(steps, name):
    for i, s in enumerate(steps):
        if s["name"] == name:
            return i
    raise Failed(f"no step {name}")


def wait_until(ex, deadline, check, cancellable=True):
    while True:
        if cancellable and ex.cancel.is_set():
            raise Cancelled()
        value = check()
        if value is not None:
            return value
        if sim_now() > deadline:
            raise TimedOut()
        sleep(5)


def instance_state(iid):
    if iid in terminating and sim_now() < terminating[iid]:
        return "shutting-down"
    r = client("ec2").describe_instances(InstanceIds=[iid])
    return r["Reservations"][0]["Instances"][0]["State"]["Name"]


failed_images = set()
client_tokens = {}


def read(ex, service, api, args, selector):
    if service == "ssm" and api == "DescribeInstanceInformation":
        # The simulated agent is Online once its instance runs.
        iid = args["InstanceInformationFilterList"][0]["valueSet"][0]
        return "Online" if instance_state(iid) == "running" else None
    if service == "ec2" and api == "DescribeInstances" and selector.endswith("State.Name"):
        return instance_state(args["InstanceIds"][0])
    if service == "ec2" and api == "DescribeImages" and args.get("ImageIds", [None])[0] in failed_images:
        return "failed"
    return select(jsonable(getattr(client(service), snake(api))(**args)), selector)


def run_step(ex, st, deadline, cancellable):
    """Runs one step; returns its outputs. Raises Failed, TimedOut or Cancelled."""
    name, action = st["name"], st["action"]
    inputs = ex.resolve(st.get("inputs", {}))
    fail = control.get("fail_at") == name
    if control.get("hold_at") == name and cancellable:
        ex.holding = name
        wait_until(ex, deadline, lambda: None)
    if action == "aws:executeAwsApi":
        args = {k: v for k, v in inputs.items() if k not in ("Service", "Api")}
        snapshot_tags = []
        if inputs["Api"] == "CreateImage":
            # moto's CreateImage takes no snapshot tag specification: tag the snapshot after.
            snapshot_tags = [t for s in args.get("TagSpecifications", []) if s["ResourceType"] == "snapshot" for t in s["Tags"]]
            args["TagSpecifications"] = [s for s in args.get("TagSpecifications", []) if s["ResourceType"] != "snapshot"]
            args.pop("NoReboot", None)
        if inputs["Api"] == "TerminateInstances" and control.get("terminate_secs"):
            for i in args["InstanceIds"]:
                terminating[i] = sim_now() + control["terminate_secs"]
        idem = (inputs["Api"], args.get("ClientToken")) if args.get("ClientToken") else None
        if inputs["Api"] == "RunInstances" and args.get("InstanceType") in control.get("launch_fails_for", []):
            t = args["InstanceType"]
            raise Failed(
                f"Step fails when it is executing action. An error occurred (InsufficientInstanceCapacity) when calling the RunInstances operation: We currently do not have sufficient {t} capacity in the Availability Zone you requested (us-east-1a). Our system will be working on provisioning additional capacity. Please refer to Automation Service Troubleshooting Guide for more diagnosis details."
            )
        try:
            if idem and idem in client_tokens:
                # EC2 returns the first call's result for a repeated client token ("Ensuring
                # idempotency in Amazon EC2 API requests"); moto launches again.
                response = client_tokens[idem]
            else:
                response = jsonable(getattr(client(inputs["Service"]), snake(inputs["Api"]))(**args))
                if idem:
                    client_tokens[idem] = response
        except Exception as e:  # the service's wording for a failed API call
            raise Failed(f"Step fails when it is executing action. {e}. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.")
        if snapshot_tags and "ImageId" in response:
            img = client("ec2").describe_images(ImageIds=[response["ImageId"]])["Images"][0]
            snaps = [m["Ebs"]["SnapshotId"] for m in img.get("BlockDeviceMappings", []) if "Ebs" in m and "SnapshotId" in m["Ebs"]]
            if snaps:
                client("ec2").create_tags(Resources=snaps, Tags=snapshot_tags)
        if fail:
            raise Failed(f"Step fails when it is verifying the action has completed. The {inputs['Api']} call returned, but the step failed. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.")
        outs = {}
        for o in st.get("outputs", []):
            v = select(response, o["Selector"])
            if v is not None:
                outs[o["Name"]] = v if isinstance(v, str) else json.dumps(v)
        return outs
    if action in ("aws:waitForAwsResourceProperty", "aws:assertAwsResourceProperty"):
        args = {k: v for k, v in inputs.items() if k not in ("Service", "Api", "PropertySelector", "DesiredValues")}
        if fail and inputs["Api"] == "DescribeInstances":
            # The launch dies at once (an EBS key the role may not use).
            client("ec2").terminate_instances(InstanceIds=args["InstanceIds"])
        elif fail and inputs["Api"] == "DescribeImages":
            failed_images.add(args["ImageIds"][0])
        elif fail:
            raise Failed(f"Step fails when it is verifying the {inputs['PropertySelector']} is one of {inputs['DesiredValues']}. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.")
        desired = inputs["DesiredValues"]
        if action == "aws:assertAwsResourceProperty":
            v = read(ex, inputs["Service"], inputs["Api"], args, inputs["PropertySelector"])
            if v not in desired:
                raise Failed(f"Step fails when it is Verifying value. The value {v} of {inputs['PropertySelector']} is not one of {desired}. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.")
            return {}
        wait_until(ex, deadline, lambda: (read(ex, inputs["Service"], inputs["Api"], args, inputs["PropertySelector"]) in desired) or None, cancellable)
        return {}
    if action == "aws:branch":
        for choice in inputs.get("Choices", []):
            if "StringEquals" in choice and str(choice.get("Variable")) == str(choice["StringEquals"]):
                return {"__next": choice["NextStep"]}
        if "Default" in inputs:
            return {"__next": inputs["Default"]}
        return {}
    if action == "aws:runCommand":
        if fail:
            cid = "4f3e2d1c-5b6a-4798-8a9b-0c1d2e3f4a5b"
            raise Failed(
                f"Step fails when it is verifying the command has completed. Command {cid} returns unexpected invocation result: \n{{Status=[Failed], ResponseCode=[1], Output=[\n----------ERROR-------\nfailed to run commands: exit status 1], CommandId=[{cid}]}}. Please refer to Automation Service Troubleshooting Guide for more diagnosis details."
            )
        sleep(10)
        outs = {"Status": "Success", "ResponseCode": "0", "CommandId": "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"}
        commands = "\n".join(inputs.get("Parameters", {}).get("commands", []))
        if "RepoDigests" in commands:
            # What `docker image inspect` reports as RepoDigests[0] for the pulled image:
            # <repository>@sha256:<hex>, the pinned digest when the reference has one. The step's
            # Output is the command's output, cut to its first 2,500 characters ("aws:runCommand -
            # Run a command on a managed instance", Output).
            ref = ex.params["ChromaImage"]
            repo, _, pinned = ref.partition("@")
            if ":" in repo.rsplit("/", 1)[-1]:
                repo = repo.rsplit(":", 1)[0]
            digest = control.get("pulled_digest") or pinned or "sha256:" + "5e" * 32
            outs["Output"] = f"{repo}@{digest}\n"[:2500]
        return outs
    if action == "aws:changeInstanceState":
        ids, want = inputs["InstanceIds"], inputs["DesiredState"]
        if fail:
            raise Failed(f"Step {name} failed maximum allowed times. You are not authorized to perform this operation. (Service: AmazonEC2; Status Code: 403; Error Code: UnauthorizedOperation)")
        ec2 = client("ec2")
        if want == "stopped":
            ec2.stop_instances(InstanceIds=ids)
        elif want == "terminated":
            ec2.terminate_instances(InstanceIds=ids)
            for i in ids:
                if control.get("terminate_secs") and i not in terminating:
                    terminating[i] = sim_now() + control["terminate_secs"]
        elif want == "running":
            ec2.start_instances(InstanceIds=ids)
        wait_until(ex, deadline, lambda: all(instance_state(i) == want for i in ids) or None, cancellable)
        return {}
    raise Failed(f"Step fails when it is executing action. The simulator does not play {action}.")


def record(ex, st):
    rec = {"StepName": st["name"], "Action": st["action"], "StepStatus": "InProgress", "ExecutionStartTime": time.time()}
    with lock:
        ex.steps.append(rec)
        ex.current = st["name"]
    return rec


def finish(rec, status, failure=None, outputs=None):
    with lock:
        rec["StepStatus"] = status
        rec["ExecutionEndTime"] = time.time()
        if failure:
            rec["FailureMessage"] = failure
        if outputs:
            rec["Outputs"] = {k: [v] for k, v in outputs.items()}


def cancel_path(ex, target):
    """onCancel: step:NAME runs from NAME on, at most two minutes in all, each step once and
    bounded only by that cap."""
    if target == "Abort" or not target:
        return
    steps = ex.doc["mainSteps"]
    i = find(steps, target.split(":", 1)[1])
    deadline = sim_now() + CANCEL_CAP
    while True:
        st = steps[i]
        rec = record(ex, st)
        try:
            outs = run_step(ex, st, deadline, cancellable=False)
            finish(rec, "Success", outputs=outs)
        except TimedOut:
            finish(rec, "Cancelled", "Step was cancelled: the cancel path ran out of its two minutes.")
            return
        except Failed as f:
            finish(rec, "Failed", str(f))
            return
        if st.get("isEnd"):
            return
        i = find(steps, st["nextStep"]) if st.get("nextStep") else i + 1
        if i >= len(steps):
            return


def play(ex):
    steps = ex.doc["mainSteps"]
    i = 0
    critical_failure = None
    try:
        while i < len(steps):
            st = steps[i]
            name = st["name"]
            if ex.cancel.is_set():
                cancel_path(ex, st.get("onCancel", "Abort"))
                ex.status = "Cancelled"
                return
            rec = record(ex, st)
            attempts = int(st.get("maxAttempts", 1))
            timeout = float(st.get("timeoutSeconds", 3600))
            outcome = None
            branch = None  # where an aws:branch step sends the execution
            for _attempt in range(attempts):
                try:
                    outs = run_step(ex, st, sim_now() + timeout, cancellable=True)
                    branch = outs.pop("__next", None)
                    for k, v in outs.items():
                        ex.outputs[f"{name}.{k}"] = v
                    finish(rec, "Success", outputs=outs)
                    outcome = None
                    break
                except Cancelled:
                    ex.holding = None
                    finish(rec, "Cancelled")
                    ex.status = "Cancelling"
                    cancel_path(ex, st.get("onCancel", "Abort"))
                    ex.status = "Cancelled"
                    return
                except TimedOut:
                    outcome = ("TimedOut", f"Step timed out while step is verifying the {name} step. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.")
                except Failed as f:
                    outcome = ("Failed", str(f))
            if outcome:
                finish(rec, *outcome)
                on_failure = st.get("onFailure", "Abort")
                if st.get("isCritical", True):
                    critical_failure = critical_failure or outcome[1]
                if on_failure == "Abort":
                    break
                if on_failure.startswith("step:"):
                    i = find(steps, on_failure[5:])
                    continue
            if outcome is None and branch:
                i = find(steps, branch)
                continue
            if st.get("isEnd"):
                break
            i = find(steps, st["nextStep"]) if st.get("nextStep") else i + 1
        if critical_failure:
            ex.status, ex.failure = "Failed", critical_failure
        else:
            ex.status = control.get("status", "Success")
    finally:
        ex.current = None
        ex.end = time.time()


def start(body):
    name, version = body["DocumentName"], body.get("DocumentVersion")
    token = body.get("ClientToken")
    if token and token in tokens:
        return 200, {"AutomationExecutionId": tokens[token]}
    args = {"Name": name, "DocumentFormat": "YAML"}
    if version:
        args["DocumentVersion"] = version
    got = client("ssm").get_document(**args)
    doc = yaml.safe_load(got["Content"])
    params = {}
    given = {k: v[0] for k, v in body.get("Parameters", {}).items()}
    for pname, spec in doc.get("parameters", {}).items():
        value = given.pop(pname, spec.get("default"))
        if value is None:
            return 400, {"__type": "InvalidAutomationExecutionParametersException", "message": f"Parameter {pname} is required but not provided."}
        pattern = spec.get("allowedPattern")
        if pattern and not re.search(pattern, str(value)):
            return 400, {"__type": "InvalidAutomationExecutionParametersException", "message": f"Parameter \"{pname}\" has value \"{value}\" not matching \"{pattern}\"."}
        params[pname] = str(value)
    if given:
        return 400, {"__type": "InvalidAutomationExecutionParametersException", "message": f"Parameters {sorted(given)} are not defined in the document."}
    import uuid

    eid = str(uuid.uuid4())
    ex = Execution(eid, name, got.get("DocumentVersion", version or "1"), doc, params)
    with lock:
        executions[eid] = ex
        if token:
            tokens[token] = eid
    threading.Thread(target=play, args=(ex,), daemon=True).start()
    return 200, {"AutomationExecutionId": eid}


def handle(target, body):
    if target == "StartAutomationExecution":
        return start(body)
    eid = body.get("AutomationExecutionId")
    if target == "GetAutomationExecution":
        ex = executions.get(eid)
        if not ex:
            return 400, {"__type": "AutomationExecutionNotFoundException", "message": f"Automation execution {eid} not found."}
        with lock:
            return 200, {"AutomationExecution": ex.answer()}
    if target == "StopAutomationExecution":
        ex = executions.get(eid)
        if not ex:
            return 400, {"__type": "AutomationExecutionNotFoundException", "message": f"Automation execution {eid} not found."}
        if ex.status in FINAL:
            return 400, {"__type": "InvalidAutomationStatusUpdateException", "message": f"The execution {eid} is already in a terminal status {ex.status}."}
        ex.status = "Cancelling"
        ex.cancel.set()
        return 200, {}
    if target == "DescribeAutomationExecutions":
        out = []
        filters = {f["Key"]: f["Values"] for f in body.get("Filters", [])}
        for ex in executions.values():
            if "DocumentNamePrefix" in filters and not any(ex.name.startswith(p) for p in filters["DocumentNamePrefix"]):
                continue
            if "ExecutionStatus" in filters and ex.status not in filters["ExecutionStatus"]:
                continue
            out.append({"AutomationExecutionId": ex.id, "DocumentName": ex.name, "AutomationExecutionStatus": ex.status, "DocumentVersion": ex.version})
        return 200, {"AutomationExecutionMetadataList": out}
    return None


def setup(body):
    project = body["project"]
    ec2, iam = client("ec2"), client("iam")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName=f"{project}-bake", Description="bake", VpcId=vpc)["GroupId"]
    profile = f"{project}-bake"
    iam.create_instance_profile(InstanceProfileName=profile)
    return {"subnet_id": subnet, "security_group_id": sg, "instance_profile": profile, "automation_role_arn": f"arn:aws:iam::123456789012:role/{project}-automation"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def json(self, status, doc):
        self.reply(status, [("Content-Type", "application/x-amz-json-1.1")], json.dumps(doc).encode())

    def do_GET(self):
        if self.path == "/sim/state":
            with lock:
                doc = {
                    e.id: {"status": e.status, "current": e.current, "holding": e.holding, "token": e.params.get("BakeToken"), "steps": [dict(x) for x in e.steps]}
                    for e in executions.values()
                }
            return self.json(200, doc)
        self.forward()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path == "/sim/control":
            control.clear()
            control.update(json.loads(raw or b"{}"))
            return self.json(200, control)
        if self.path == "/sim/setup":
            return self.json(200, setup(json.loads(raw)))
        target = (self.headers.get("X-Amz-Target") or "").split(".")[-1]
        if target:
            answered = handle(target, json.loads(raw or b"{}"))
            if answered:
                return self.json(*answered)
        self.forward(raw)

    def forward(self, raw=None):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        req = urllib.request.Request(MOTO + self.path, data=raw, headers=headers, method=self.command)
        try:
            with urllib.request.urlopen(req) as r:
                status, hdrs, body = r.status, r.getheaders(), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, body = e.code, e.headers.items(), e.read()
        keep = [(k, v) for k, v in hdrs if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date")]
        self.reply(status, keep, body)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
