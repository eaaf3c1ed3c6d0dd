#!/usr/bin/env python3
"""Uploads FILE to s3://BUCKET/KEY of an S3 endpoint (moto_server in the
tests), with the credentials of the AWS_* environment.

usage: s3put.py BUCKET KEY FILE
"""
import os
import sys

import boto3

bucket, key, path = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
s3.upload_file(path, bucket, key)
