// Routines on Azure: a Flex Consumption (Linux, Python 3.11) function app with a user-assigned
// managed identity, identity-based storage (shared keys off), Application Insights on a Log
// Analytics workspace (Entra-only ingestion), least-privilege role assignments, and every
// Routines app setting of the README's Configuration table as a parameter with its default.
//
// Deploy with `azd up` (azure.yaml, main.parameters.json) or
// `az deployment sub create --location <region> --template-file infra/main.bicep --parameters environmentName=<name> location=<region>`.
// See docs/deployment.md.

targetScope = 'subscription'

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('Environment name (azd: AZURE_ENV_NAME). Seeds resource names and the azd-env-name tag.')
param environmentName string

@minLength(1)
@description('Region of every resource. It must offer the Flex Consumption plan: `az functionapp list-flexconsumption-locations`.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group to create or reuse; default rg-<environmentName>.')
param resourceGroupName string = ''

@description('Object id of the person deploying (azd: AZURE_PRINCIPAL_ID). Used only with grantDeveloperDataAccess.')
param principalId string = ''

@description('Also give principalId Storage Queue/Table Data Contributor on the account, to inspect runs with --auth-mode login.')
param grantDeveloperDataAccess bool = false

@description('Optional name overrides; empty means a generated, globally unique name.')
param functionAppName string = ''
param storageAccountName string = ''

// ---------------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------------

@description('Upper bound on instances the plan scales out to (Flex Consumption accepts 40-1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory of each instance; on-demand execution is billed per GB-second of this size.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

// ---------------------------------------------------------------------------------------------
// Routines settings (README, Configuration). Defaults are the documented ones; tests/test_infra.py checks they
// match routines/config.py.
// ---------------------------------------------------------------------------------------------

@description('ROUTINES_STORAGE_CONNECTION: name of the storage connection Routines uses.')
param storageConnectionName string = 'AzureWebJobsStorage'

@description('ROUTINES_QUEUE_NAME: dispatch queue; its poison queue is <name>-poison.')
@minLength(3)
@maxLength(56)
param queueName string = 'routine-dispatch'

@description('ROUTINES_TABLE_PREFIX: prefix of every table (<prefix>Routines, <prefix>Runs).')
@minLength(1)
@maxLength(40)
param tablePrefix string = 'routines'

@description('ROUTINES_AGENT_BACKEND: foundry or http.')
@allowed([
  'foundry'
  'http'
])
param agentBackend string = 'foundry'

@description('ROUTINES_FOUNDRY_PROJECT_ENDPOINT: https://<resource>.services.ai.azure.com/api/projects/<project>.')
param foundryProjectEndpoint string = ''

@description('ROUTINES_AGENT_ENDPOINT: base URL of the HTTP agent backend.')
param agentEndpoint string = ''

@description('ROUTINES_AGENT_TOKEN: bearer token for the HTTP backend. For production use a Key Vault reference.')
@secure()
param agentToken string = ''

@description('ROUTINES_AGENT_SIGNING_SECRET: HMAC secret for the HTTP backend. For production use a Key Vault reference.')
@secure()
param agentSigningSecret string = ''

@description('ROUTINES_MIN_INTERVAL_SECONDS: shortest allowed cron interval.')
@minValue(1)
param minIntervalSeconds int = 60

@description('ROUTINES_REPAIR_AFTER_SECONDS: a run with nothing in flight this long is resumed by the repair pass.')
@minValue(1)
param repairAfterSeconds int = 90

@description('ROUTINES_RUN_RETENTION_DAYS: run history retention.')
@minValue(1)
param runRetentionDays int = 30

@description('ROUTINES_RUN_ARCHIVE_CONTAINER: blob container purged runs are archived to (created here when set); empty for none.')
param runArchiveContainer string = ''

@description('ROUTINES_LOG_FORMAT: text, or json for one JSON object per log line with trace ids.')
@allowed(['text', 'json'])
param logFormat string = 'text'

// ---------------------------------------------------------------------------------------------
// Webhook secrets (optional). POST /api/hooks/{routine} is anonymous at the Functions level: the
// delivery's signature is its authentication, checked against the secret in the app setting the
// routine's trigger names (secret_setting). Keep those secrets in Key Vault: each entry below
// becomes an app setting holding a Key Vault reference, resolved by the platform with the app's
// identity, so the secret is never in the template, the deployment or Routines' tables.
// ---------------------------------------------------------------------------------------------

@description('Webhook secret settings: {"<SETTING_NAME>": "https://<vault>.vault.azure.net/secrets/<name>"}; a webhook trigger names the setting in secret_setting.')
param webhookSecretUris object = {}

@description('Key Vault (RBAC model) holding those secrets: the identity gets Key Vault Secrets User on it; empty to grant it yourself.')
param webhookKeyVaultName string = ''

@description('Resource group of that vault; empty means the app\'s resource group.')
param webhookKeyVaultResourceGroupName string = ''

// ---------------------------------------------------------------------------------------------
// Foundry access (optional). With an account name, the identity gets "Azure AI User" on the
// project (or the account when no project is named). Without one, grant it by hand: see
// docs/deployment.md.
// ---------------------------------------------------------------------------------------------

@description('Existing Foundry (AI Services) account the app calls; empty to skip the role assignment.')
param foundryAccountName string = ''

@description('Resource group of that account; empty means the app\'s resource group.')
param foundryResourceGroupName string = ''

@description('Foundry project under the account; empty grants on the whole account.')
param foundryProjectName string = ''

// ---------------------------------------------------------------------------------------------
// Foundry drop-in (/api/foundry: Foundry Routines' SDK against this app; README, "Coming from
// Foundry Routines"). Off, or behind App Service Authentication with Entra ID: there is no
// unauthenticated choice in Azure, and entra without a client id fails the deployment.
// ---------------------------------------------------------------------------------------------

@description('ROUTINES_FOUNDRY_API: off, or entra (an Entra bearer token, validated by App Service Authentication, is the credential).')
@allowed([
  'off'
  'entra'
])
param foundryApi string = 'off'

@description('With foundryApi=entra: client id of the Entra app registration whose tokens the app accepts.')
param foundryApiClientId string = ''

@description('With foundryApi=entra: accepted token audiences; empty means api://<foundryApiClientId>. Add https://ai.azure.com to accept the SDK\'s default token unchanged.')
param foundryApiAudiences array = []

@description('With foundryApi=entra: object ids of the principals allowed; empty allows any principal of the tenant holding a token for an accepted audience.')
param foundryApiAllowedPrincipalIds array = []

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var appName = !empty(functionAppName) ? functionAppName : 'func-api-${resourceToken}'
var deploymentContainerName = 'app-package-${take(appName, 32)}-${take(resourceToken, 7)}'

resource rg 'Microsoft.Resources/resourceGroups@2021-04-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity './app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-api-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage './app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: !empty(storageAccountName) ? storageAccountName : 'st${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    queueName: queueName
    tablePrefix: tablePrefix
    archiveContainerName: runArchiveContainer
  }
}

module monitoring './app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module rbac './app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    principalId: identity.outputs.principalId
    developerPrincipalId: grantDeveloperDataAccess ? principalId : ''
  }
}

module foundryRbac './app/foundry-rbac.bicep' = if (!empty(foundryAccountName)) {
  name: 'foundry-rbac'
  scope: resourceGroup(!empty(foundryResourceGroupName) ? foundryResourceGroupName : rg.name)
  params: {
    accountName: foundryAccountName
    projectName: foundryProjectName
    principalId: identity.outputs.principalId
  }
}

// Every Routines setting of the README's Configuration table (APPLICATIONINSIGHTS_CONNECTION_STRING and the
// identity wiring are added in function.bicep). Empty values are read as "not set".
var routinesSettings = {
  ROUTINES_STORAGE_CONNECTION: storageConnectionName
  ROUTINES_QUEUE_NAME: queueName
  ROUTINES_TABLE_PREFIX: tablePrefix
  ROUTINES_AGENT_BACKEND: agentBackend
  ROUTINES_FOUNDRY_PROJECT_ENDPOINT: foundryProjectEndpoint
  ROUTINES_AGENT_ENDPOINT: agentEndpoint
  ROUTINES_AGENT_TOKEN: agentToken
  ROUTINES_AGENT_SIGNING_SECRET: agentSigningSecret
  ROUTINES_MIN_INTERVAL_SECONDS: string(minIntervalSeconds)
  ROUTINES_RUN_RETENTION_DAYS: string(runRetentionDays)
  ROUTINES_REPAIR_AFTER_SECONDS: string(repairAfterSeconds)
  ROUTINES_RUN_ARCHIVE_CONTAINER: runArchiveContainer
  ROUTINES_LOG_FORMAT: logFormat
  ROUTINES_FOUNDRY_API: foundryApi
  // Keep or drop whole traces (tick -> dispatch -> agent), not parts of them.
  OTEL_TRACES_SAMPLER: 'microsoft.fixed_percentage'
  OTEL_TRACES_SAMPLER_ARG: '1.0'
}

module keyVaultRbac './app/keyvault-rbac.bicep' = if (!empty(webhookKeyVaultName)) {
  name: 'keyvault-rbac'
  scope: resourceGroup(!empty(webhookKeyVaultResourceGroupName) ? webhookKeyVaultResourceGroupName : rg.name)
  params: {
    keyVaultName: webhookKeyVaultName
    principalId: identity.outputs.principalId
  }
}

// One Key Vault reference per webhook secret setting (names chosen by the user).
var webhookSecretReferences = toObject(
  items(webhookSecretUris),
  entry => entry.key,
  entry => '@Microsoft.KeyVault(SecretUri=${entry.value})'
)

module api './app/function.bicep' = {
  name: 'function'
  scope: rg
  params: {
    planName: 'plan-${resourceToken}'
    functionAppName: appName
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    blobEndpoint: storage.outputs.blobEndpoint
    queueEndpoint: storage.outputs.queueEndpoint
    tableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerName: deploymentContainerName
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    storageConnectionName: storageConnectionName
    appSettings: union(routinesSettings, webhookSecretReferences)
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
  // Start the host only once its identity can reach storage, Application Insights and the vault.
  dependsOn: [
    rbac
    keyVaultRbac
  ]
}

module foundryAuth './app/easyauth.bicep' = if (foundryApi == 'entra') {
  name: 'foundry-auth'
  scope: rg
  params: {
    functionAppName: api.outputs.name
    clientId: foundryApiClientId
    audiences: foundryApiAudiences
    allowedPrincipalIds: foundryApiAllowedPrincipalIds
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output SERVICE_API_URI string = 'https://${api.outputs.defaultHostName}'
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
