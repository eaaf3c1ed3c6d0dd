#!/usr/bin/env python3
"""Prepares a moto_server started with INITIAL_NO_AUTH_ACTION_COUNT=3 for the
remote-base tests: its first three (unauthenticated) requests create an IAM
user allowed everything and that user's access key; then, with that key,
the bucket. Prints "KEY_ID SECRET".

usage: moto_setup.py ENDPOINT BUCKET
"""
import json
import sys

import boto3

endpoint, bucket = sys.argv[1], sys.argv[2]
common = dict(endpoint_url=endpoint, region_name="us-east-1")
iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **common)
iam.create_user(UserName="tester")
iam.put_user_policy(
    UserName="tester",
    PolicyName="all",
    PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    ),
)
key = iam.create_access_key(UserName="tester")["AccessKey"]
s3 = boto3.client(
    "s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], **common
)
s3.create_bucket(Bucket=bucket)
print(key["AccessKeyId"], key["SecretAccessKey"])
