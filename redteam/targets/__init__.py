"""The target zoo. Importing this package registers every target family in ``TARGETS``."""

from redteam.targets import arcface, blazeface, dlib_resnet, faceapi, facenet, mtcnn, retinaface, scrfd  # noqa: F401
from redteam.targets import facenet_at  # noqa: F401
from redteam.targets.base import TARGETS, Detections, FaceDetector, FaceRecognizer, ModelCard

__all__ = ["TARGETS", "Detections", "FaceDetector", "FaceRecognizer", "ModelCard"]
