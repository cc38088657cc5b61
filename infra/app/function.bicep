// Flex Consumption plan (FC1, Linux) and the Python 3.11 function app, running as the
// user-assigned identity. Host storage, the deployment package and Application Insights are
// all reached with that identity: no account key or instrumentation-key-only connection string
// is stored anywhere.
//
// Flex Consumption rejects FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION,
// WEBSITE_RUN_FROM_PACKAGE and WEBSITE_TIME_ZONE: runtime and version live in
// functionAppConfig.runtime, the package in functionAppConfig.deployment, and schedules are UTC.

param planName string
param functionAppName string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string
@description('Client id of that identity (AZURE_CLIENT_ID, AzureWebJobsStorage__clientId).')
param identityClientId string

param blobEndpoint string
param queueEndpoint string
param tableEndpoint string
@description('Blob container (in the same account) holding the deployment package.')
param deploymentContainerName string

param applicationInsightsConnectionString string

@description('Name of the storage connection Routines uses (ROUTINES_STORAGE_CONNECTION).')
param storageConnectionName string = 'AzureWebJobsStorage'

@description('Routines app settings (README, Configuration). Secure: it carries the HTTP-backend token and signing secret.')
@secure()
param appSettings object

@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

param pythonVersion string = '3.11'

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: functionAppName
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Key Vault references in app settings (webhook secrets) resolve as the user-assigned identity.
    keyVaultReferenceIdentity: identityId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${blobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// Identity-based host storage: the Functions host (timers, queue trigger, leases) and, through
// the same names, Routines itself (routines/config.py reads <connection>__*ServiceUri and
// <connection>__clientId).
var hostStorageSettings = {
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsStorage__blobServiceUri: blobEndpoint
  AzureWebJobsStorage__queueServiceUri: queueEndpoint
  AzureWebJobsStorage__tableServiceUri: tableEndpoint
}

// When Routines is pointed at a connection name other than the host's, define that connection
// too (same account, same identity) so ROUTINES_STORAGE_CONNECTION always resolves.
var routinesConnectionSettings = storageConnectionName == 'AzureWebJobsStorage' ? {} : {
  '${storageConnectionName}__credential': 'managedidentity'
  '${storageConnectionName}__clientId': identityClientId
  '${storageConnectionName}__blobServiceUri': blobEndpoint
  '${storageConnectionName}__queueServiceUri': queueEndpoint
  '${storageConnectionName}__tableServiceUri': tableEndpoint
}

// DefaultAzureCredential picks the user-assigned identity from AZURE_CLIENT_ID; the host's
// Application Insights integration authenticates with the authentication string.
var platformSettings = {
  AZURE_CLIENT_ID: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
}

// The platform wiring comes last so a caller's appSettings cannot silently replace it.
resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(appSettings, routinesConnectionSettings, hostStorageSettings, platformSettings)
}

output name string = functionApp.name
output id string = functionApp.id
output defaultHostName string = functionApp.properties.defaultHostName
